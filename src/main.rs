//! The `post-provision` command; see `post_provision::cli` for the commands and exit codes.

#[tokio::main]
async fn main() {
    let code = post_provision::cli::run(std::env::args().collect()).await;
    std::process::exit(code);
}
