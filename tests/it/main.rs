//! Integration tests: the real aws-sdk-rust clients against the moto emulator that
//! `scripts/test` starts (it exports `AWS_ENDPOINT_URL`). One binary, so the SDKs link once.

// The differential test's sequence is one long future over every SDK's types: proving it `Send`
// nests deeper than the default limit of 128.
#![recursion_limit = "256"]

mod harness;

mod action;
mod audit;
mod bad_input;
mod cli;
mod crash;
mod creation_tag;
mod differential;
mod faults;
mod github;
mod history;
mod identity;
mod interplay;
mod paths;
mod policy;
mod pool_messages;
mod scale;
mod snapshots;
mod trust;
