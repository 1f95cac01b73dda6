//! Turning SDK errors into [`AwsError`]s, keeping the service's code and deciding its class.

use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::ports::{AwsError, ErrorClass};

/// The class of an AWS error code (and HTTP status, when there is one). Pure; unit-tested.
pub fn classify_code(code: &str, status: Option<u16>) -> ErrorClass {
    match code {
        "ThrottlingException" | "Throttling" | "ThrottlingError" | "RequestLimitExceeded" | "RequestThrottled"
        | "RequestThrottledException" | "ProvisionedThroughputExceededException" | "TooManyRequestsException"
        | "TransactionConflict" | "TransactionConflictException" | "TransactionInProgressException"
        | "SlowDown" | "PriorRequestNotComplete" | "RequestLimitExceededException" => ErrorClass::Throttling,
        "InternalServerError" | "InternalError" | "InternalFailure" | "ServiceUnavailable"
        | "ServiceUnavailableException" | "Unavailable" | "RequestTimeout" | "RequestTimeoutException" => {
            ErrorClass::Transient
        }
        "ConditionalCheckFailedException" | "ConditionalCheckFailed" => ErrorClass::ConditionFailed,
        "ResourceNotFoundException" | "AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist"
        | "InvalidInstanceID.NotFound" => ErrorClass::NotFound,
        "ValidationException" | "InvalidParameterValue" | "InvalidParameterCombination" | "MissingParameter"
        | "InvalidInstanceID.Malformed" | "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation"
        | "InvalidClientTokenId" | "UnrecognizedClientException" | "InvalidAddress" | "InvalidParameter"
        | "IdempotentParameterMismatch" | "IdempotentParameterMismatchException" | "SerializationException" => {
            ErrorClass::Invalid
        }
        _ => match status {
            Some(status) if status >= 500 => ErrorClass::Transient,
            Some(429) => ErrorClass::Throttling,
            _ => ErrorClass::Other,
        },
    }
}

/// Converts an SDK error, keeping the code. Transport failures and timeouts are transient.
pub(crate) fn from_sdk<E, R>(service: &'static str, operation: &'static str, error: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let transport = |message: String| AwsError {
        service,
        operation,
        code: None,
        message,
        class: ErrorClass::Transient,
    };
    match &error {
        SdkError::TimeoutError(_) => transport("timed out".to_string()),
        SdkError::DispatchFailure(failure) => transport(format!("could not send the request: {failure:?}")),
        SdkError::ResponseError(_) => transport("could not read the response".to_string()),
        SdkError::ConstructionFailure(_) => AwsError {
            service,
            operation,
            code: None,
            message: format!("could not build the request: {}", aws_smithy_types::error::display::DisplayErrorContext(&error)),
            class: ErrorClass::Invalid,
        },
        _ => {
            let code = error.code().map(str::to_string);
            let message = error.message().map(str::to_string).unwrap_or_else(|| {
                aws_smithy_types::error::display::DisplayErrorContext(&error).to_string()
            });
            let class = classify_code(code.as_deref().unwrap_or(""), None);
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
        assert_eq!(classify_code("InvalidInstanceID.NotFound", Some(400)), ErrorClass::NotFound);
        assert_eq!(classify_code("AWS.SimpleQueueService.NonExistentQueue", Some(400)), ErrorClass::NotFound);
        assert_eq!(classify_code("SomethingNew", Some(502)), ErrorClass::Transient);
        assert_eq!(classify_code("SomethingNew", Some(400)), ErrorClass::Other);
        assert!(ErrorClass::Throttling.is_retryable() && !ErrorClass::ConditionFailed.is_retryable());
    }
}
