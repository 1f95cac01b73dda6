//! Turning SDK errors into [`AwsError`]s, keeping the service's code and deciding its class.

use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::ports::{AwsError, ErrorClass};

/// Throttling codes the SDK's list ([`THROTTLING_ERRORS`]) does not hold: DynamoDB's
/// transaction cancellation reasons (`ThrottlingError`, and the conflicts, which are load on an
/// item rather than an error), and codes some services send with another suffix.
const MORE_THROTTLING_ERRORS: &[&str] = &[
    "ThrottlingError",
    // `ProvisionedThroughputExceededException` as a cancellation reason names it per item.
    "ProvisionedThroughputExceeded",
    "TransactionConflict",
    "TransactionConflictException",
    "RequestLimitExceededException",
];

/// Transient codes the SDK's list ([`TRANSIENT_ERRORS`]) does not hold, because it classifies
/// them by their HTTP status: a transaction's cancellation reason carries a code and no status.
const MORE_TRANSIENT_ERRORS: &[&str] = &[
    "InternalServerError",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "Unavailable",
];

/// The class of an AWS error code (and HTTP status, when there is one). Pure; unit-tested.
///
/// Throttling and transient codes come from the SDK's own retry classifier
/// (`aws_runtime::retries::classifiers`), so that what the SDK retried is never taken for a
/// final error once its retries are spent, plus the few it decides by status instead.
pub fn classify_code(code: &str, status: Option<u16>) -> ErrorClass {
    if THROTTLING_ERRORS.contains(&code) || MORE_THROTTLING_ERRORS.contains(&code) {
        return ErrorClass::Throttling;
    }
    if TRANSIENT_ERRORS.contains(&code) || MORE_TRANSIENT_ERRORS.contains(&code) {
        return ErrorClass::Transient;
    }
    match code {
        "ConditionalCheckFailedException" | "ConditionalCheckFailed" => ErrorClass::ConditionFailed,
        "AccessDenied"
        | "AccessDeniedException"
        | "UnauthorizedOperation"
        | "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "AuthFailure"
        | "SignatureDoesNotMatch"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "IncompleteSignature"
        | "KMS.AccessDeniedException"
        | "KmsAccessDenied"
        | "KMS.DisabledException"
        | "KmsDisabled" => ErrorClass::Permission,
        "ResourceNotFoundException"
        | "AWS.SimpleQueueService.NonExistentQueue"
        | "QueueDoesNotExist"
        | "InvalidInstanceID.NotFound" => ErrorClass::NotFound,
        "ValidationException"
        | "InvalidParameterValue"
        | "InvalidParameterCombination"
        | "MissingParameter"
        | "InvalidInstanceID.Malformed"
        | "InvalidAddress"
        | "InvalidParameter"
        | "IdempotentParameterMismatch"
        | "IdempotentParameterMismatchException"
        | "SerializationException" => ErrorClass::Invalid,
        _ => match status {
            Some(status) if status >= 500 => ErrorClass::Transient,
            Some(429) => ErrorClass::Throttling,
            Some(401 | 403) => ErrorClass::Permission,
            _ => ErrorClass::Other,
        },
    }
}

/// An error and its sources on one line, `outer: inner: innermost`. Unlike the SDK's
/// `DisplayErrorContext`, it appends no Debug dump of the nested structs.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// The credential chain's failure, when `error` (or one of its sources) is one: the SDK reports
/// "no credentials" as a dispatch failure whose source is a `CredentialsError`, with a
/// multi-line list of the providers it tried. Returned on one line.
fn credentials_failure(error: &(dyn std::error::Error + 'static)) -> Option<(ErrorClass, String)> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(credentials) = error.downcast_ref::<CredentialsError>() {
            let class = match credentials {
                // IMDS or an SSO endpoint that did not answer in time may answer later.
                CredentialsError::ProviderTimedOut(_) => ErrorClass::Transient,
                _ => ErrorClass::Permission,
            };
            return Some((class, format!("no usable AWS credentials: {}", one_line(&error_chain(credentials)))));
        }
        current = error.source();
    }
    None
}

/// Lines joined with "; ", runs of spaces collapsed: one line for a log or an exit message.
fn one_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join("; ")
}

/// Converts an SDK error, keeping the code. Transport failures and timeouts are transient; a
/// service error whose code is unknown is classified by its HTTP status.
pub(crate) fn from_sdk<E>(service: &'static str, operation: &'static str, error: SdkError<E, HttpResponse>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let transport =
        |message: String| AwsError { service, operation, code: None, message, class: ErrorClass::Transient };
    match &error {
        SdkError::TimeoutError(_) => transport("timed out".to_string()),
        // One readable line ("io error: connection closed before message completed"), not the
        // SDK's Debug dump of nested structs.
        SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) if credentials_failure(&error).is_some() => {
            let (class, message) = credentials_failure(&error).expect("checked");
            AwsError { service, operation, code: None, message, class }
        }
        SdkError::DispatchFailure(failure) => match failure.as_connector_error() {
            Some(connector) => transport(format!("could not send the request: {}", error_chain(connector))),
            None => transport("could not send the request".to_string()),
        },
        SdkError::ResponseError(response) => {
            transport(format!("could not read the response (HTTP {})", response.raw().status().as_u16()))
        }
        SdkError::ConstructionFailure(_) => AwsError {
            service,
            operation,
            code: None,
            message: format!("could not build the request: {}", error_chain(&error)),
            class: ErrorClass::Invalid,
        },
        _ => {
            let code = error.code().map(str::to_string);
            let message = error.message().map(str::to_string).unwrap_or_else(|| error_chain(&error));
            let status = error.raw_response().map(|response| response.status().as_u16());
            let class = classify_code(code.as_deref().unwrap_or(""), status);
            AwsError { service, operation, code, message, class }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decide_the_class() {
        assert_eq!(classify_code("RequestLimitExceeded", Some(503)), ErrorClass::Throttling);
        assert_eq!(classify_code("ThrottlingException", Some(400)), ErrorClass::Throttling);
        assert_eq!(classify_code("ProvisionedThroughputExceededException", None), ErrorClass::Throttling);
        assert_eq!(classify_code("TransactionConflict", None), ErrorClass::Throttling);
        assert_eq!(classify_code("InternalServerError", Some(500)), ErrorClass::Transient);
        assert_eq!(classify_code("ConditionalCheckFailedException", Some(400)), ErrorClass::ConditionFailed);
        assert_eq!(classify_code("ValidationException", Some(400)), ErrorClass::Invalid);
        for code in [
            "AccessDenied",
            "AccessDeniedException",
            "UnauthorizedOperation",
            "UnrecognizedClientException",
            "InvalidClientTokenId",
            "ExpiredToken",
            "ExpiredTokenException",
            "AuthFailure",
            "KMS.AccessDeniedException",
        ] {
            assert_eq!(classify_code(code, Some(400)), ErrorClass::Permission, "{code}");
        }
        assert_eq!(classify_code("SomethingNew", Some(403)), ErrorClass::Permission);
        assert_eq!(classify_code("InvalidInstanceID.NotFound", Some(400)), ErrorClass::NotFound);
        assert_eq!(classify_code("AWS.SimpleQueueService.NonExistentQueue", Some(400)), ErrorClass::NotFound);
        assert_eq!(classify_code("SomethingNew", Some(502)), ErrorClass::Transient);
        assert_eq!(classify_code("SomethingNew", Some(400)), ErrorClass::Other);
        assert_eq!(classify_code("", Some(503)), ErrorClass::Transient);
        assert_eq!(classify_code("", Some(429)), ErrorClass::Throttling);
        assert_eq!(classify_code("RequestThrottled", Some(400)), ErrorClass::Throttling);
        assert_eq!(classify_code("InternalError", Some(500)), ErrorClass::Transient);
        assert!(ErrorClass::Throttling.is_retryable() && !ErrorClass::ConditionFailed.is_retryable());
    }

    fn response(status: u16) -> HttpResponse {
        HttpResponse::new(status.try_into().expect("status"), aws_smithy_types::body::SdkBody::empty())
    }

    #[test]
    fn an_unknown_code_is_classified_by_its_http_status() {
        use aws_sdk_dynamodb::operation::get_item::GetItemError;
        let unknown =
            || GetItemError::generic(aws_smithy_types::error::ErrorMetadata::builder().code("SomethingNew").build());
        let error = from_sdk("DynamoDB", "GetItem", SdkError::service_error(unknown(), response(503)));
        assert_eq!((error.code.as_deref(), error.class), (Some("SomethingNew"), ErrorClass::Transient));
        let error = from_sdk("DynamoDB", "GetItem", SdkError::service_error(unknown(), response(400)));
        assert_eq!(error.class, ErrorClass::Other);
    }

    #[test]
    fn transport_failures_are_one_readable_line() {
        use aws_sdk_dynamodb::operation::get_item::GetItemError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let failure = ConnectorError::io("connection closed before message completed".into());
        let error = from_sdk::<GetItemError>("DynamoDB", "GetItem", SdkError::dispatch_failure(failure));
        assert_eq!(error.class, ErrorClass::Transient);
        assert_eq!(error.message, "could not send the request: io error: connection closed before message completed");
    }

    #[test]
    fn missing_credentials_are_a_permission_error_on_one_line() {
        use aws_credential_types::provider::error::CredentialsError;
        use aws_sdk_dynamodb::operation::get_item::GetItemError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        let chain = CredentialsError::not_loaded(
            "no credentials found in chain. Attempted:\n  Environment: environment variable not set\n  Profile: not enabled",
        );
        let failure = ConnectorError::other(Box::new(chain), None);
        let error = from_sdk::<GetItemError>("DynamoDB", "GetItem", SdkError::dispatch_failure(failure));
        assert_eq!(error.class, ErrorClass::Permission);
        assert!(!error.message.contains('\n'), "{}", error.message);
        assert!(error.message.starts_with("no usable AWS credentials: "), "{}", error.message);
        assert!(
            error.message.contains("Attempted:; Environment: environment variable not set; Profile"),
            "{}",
            error.message
        );
        let timed_out = CredentialsError::provider_timed_out(std::time::Duration::from_secs(1));
        let failure = ConnectorError::other(Box::new(timed_out), None);
        let error = from_sdk::<GetItemError>("DynamoDB", "GetItem", SdkError::dispatch_failure(failure));
        assert_eq!(error.class, ErrorClass::Transient);
    }

    #[test]
    fn every_code_the_sdk_retries_is_retryable_here() {
        // The SDK's own lists, and the codes the hand-written copy held (aws-runtime 1.x): if a
        // new SDK drops one of them, this fails, so the change of behaviour is seen.
        let copied = [
            "Throttling",
            "ThrottlingException",
            "ThrottledException",
            "RequestThrottledException",
            "TooManyRequestsException",
            "ProvisionedThroughputExceededException",
            "TransactionInProgressException",
            "RequestLimitExceeded",
            "BandwidthLimitExceeded",
            "LimitExceededException",
            "RequestThrottled",
            "SlowDown",
            "PriorRequestNotComplete",
            "EC2ThrottledException",
            "ThrottlingError",
            "TransactionConflict",
            "TransactionConflictException",
            "RequestLimitExceededException",
            "ProvisionedThroughputExceeded",
        ];
        for code in THROTTLING_ERRORS.iter().chain(&copied) {
            assert_eq!(classify_code(code, Some(400)), ErrorClass::Throttling, "{code}");
        }
        let transient = ["InternalServerError", "InternalError", "InternalFailure", "ServiceUnavailable"];
        for code in TRANSIENT_ERRORS.iter().chain(&transient).chain(&["Unavailable", "RequestTimeoutException"]) {
            assert_eq!(classify_code(code, None), ErrorClass::Transient, "{code}");
        }
    }
}
