//! The two AWS calls made without a service crate: Lambda's `Invoke` (the stack's attach
//! function) and IoT's `AttachPolicy` (older stacks). A service crate compiles its whole API:
//! aws-sdk-iot and aws-sdk-lambda were 31 % of a cold build (docs/benchmarks.md, "Build
//! time") for one operation each. Both are REST JSON calls: signed here with the SDK's own
//! signer (aws-sigv4) and sent through the same HTTP connector as the SDK's calls
//! (`aws::Api`), so the proxy, the trust store and the timeouts are the same.

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::http::HttpConnector;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::http::Headers;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::error::display::DisplayErrorContext;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::aws::{Api, AwsCredentials, AwsFailure, OPERATION_TIMEOUT};

/// A path label's encoding (Smithy's HTTP binding): all but RFC 3986's unreserved characters,
/// so an ARN's colons and a policy name's `+=,@` stay inside their segment.
const LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// One REST call: the service's signing name (also its endpoint's host prefix), the method, the
/// path with its labels encoded, extra headers and the body.
#[derive(Debug)]
pub struct Call {
    pub service: &'static str,
    pub method: &'static str,
    pub path: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Call {
    /// Lambda `Invoke`, synchronous, of `function` (a name or an ARN) with `payload`.
    pub fn invoke(function: &str, payload: Vec<u8>) -> Call {
        Call {
            service: "lambda",
            method: "POST",
            path: format!("/2015-03-31/functions/{}/invocations", label(function)),
            headers: vec![("x-amz-invocation-type", "RequestResponse".to_owned())],
            body: payload,
        }
    }

    /// IoT `AttachPolicy` of `policy` to `target` (an identity id).
    pub fn attach_policy(policy: &str, target: &str) -> Call {
        Call {
            service: "iot",
            method: "PUT",
            path: format!("/target-policies/{}", label(policy)),
            headers: vec![("content-type", "application/json".to_owned())],
            body: serde_json::json!({ "target": target })
                .to_string()
                .into_bytes(),
        }
    }
}

fn label(value: &str) -> String {
    utf8_percent_encode(value, LABEL).to_string()
}

/// A 2xx answer: its headers and body.
#[derive(Debug)]
pub struct Answer {
    pub headers: Headers,
    pub body: Vec<u8>,
}

/// Signs `call` with `credentials` and sends it; any other answer than a 2xx is a failure with
/// the service's error code, as the SDK would have reported it.
pub async fn send(
    api: &Api,
    credentials: &AwsCredentials,
    call: Call,
) -> Result<Answer, AwsFailure> {
    let region = api.region();
    let endpoint = endpoint(call.service, &region, api.endpoint_url.as_deref(), |name| {
        std::env::var(name).ok()
    });
    let url = format!("{endpoint}{}", call.path);
    let request = signed_request(&call, &url, &region, credentials, SystemTime::now())?;
    let exchange = async {
        let response = api.http.call(request).await.map_err(|error| AwsFailure {
            code: None,
            message: format!(
                "{} {}: {}",
                call.service,
                call.method,
                DisplayErrorContext(&error)
            ),
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = ByteStream::new(response.into_body())
            .collect()
            .await
            .map_err(|error| AwsFailure {
                code: None,
                message: format!("reading the {} answer: {error}", call.service),
            })?
            .to_vec();
        if (200..300).contains(&status) {
            Ok(Answer { headers, body })
        } else {
            Err(failure(status, &headers, &body))
        }
    };
    tokio::time::timeout(OPERATION_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(AwsFailure {
                code: None,
                message: format!(
                    "{} gave no answer within {OPERATION_TIMEOUT:?}",
                    call.service
                ),
            })
        })
}

/// Where `service` is reached, in the SDK's order ("Service-specific endpoints", AWS SDKs and
/// Tools Reference Guide): `aws.endpoint_url`, then `AWS_ENDPOINT_URL_<SERVICE>`, then
/// `AWS_ENDPOINT_URL` (emulators), else `https://<service>.<region>.<partition's domain>`.
fn endpoint(
    service: &str,
    region: &str,
    configured: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> String {
    let service_variable = format!("AWS_ENDPOINT_URL_{}", service.to_uppercase());
    let chosen = configured
        .map(str::to_owned)
        .or_else(|| env(&service_variable))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .filter(|url| !url.is_empty());
    match chosen {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None if region.starts_with("cn-") => format!("https://{service}.{region}.amazonaws.com.cn"),
        None => format!("https://{service}.{region}.amazonaws.com"),
    }
}

/// The request with its SigV4 headers (`Authorization`, `X-Amz-Date`, the session token).
fn signed_request(
    call: &Call,
    url: &str,
    region: &str,
    credentials: &AwsCredentials,
    time: SystemTime,
) -> Result<HttpRequest, AwsFailure> {
    let signing = |error: String| AwsFailure {
        code: None,
        message: format!("cannot sign the {} call: {error}", call.service),
    };
    let identity: Identity = credentials.to_sdk().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(call.service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| signing(e.to_string()))?
        .into();
    let signable = SignableRequest::new(
        call.method,
        url,
        call.headers
            .iter()
            .map(|(name, value)| (*name, value.as_str())),
        SignableBody::Bytes(&call.body),
    )
    .map_err(|e| signing(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| signing(e.to_string()))?
        .into_parts();
    let mut request = HttpRequest::new(SdkBody::from(call.body.clone()));
    request
        .set_uri(url)
        .map_err(|e| signing(format!("bad URL {url:?}: {e}")))?;
    request
        .set_method(call.method)
        .map_err(|e| signing(e.to_string()))?;
    let headers = request.headers_mut();
    let signed = instructions
        .headers()
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
    let ours = call
        .headers
        .iter()
        .map(|(name, value)| ((*name).to_owned(), value.clone()));
    for (name, value) in ours.chain(signed) {
        // A session token with a character no header may carry: refused, not a panic.
        headers
            .try_insert(name.clone(), value)
            .map_err(|_| signing(format!("the {name} header cannot carry its value")))?;
    }
    Ok(request)
}

/// A REST JSON service's refusal: the error code from the `x-amzn-ErrorType` header, else the
/// body's `code` or `__type`, stripped of a namespace (`…#Code`) and of anything after `:`; the
/// message from the body's `message` or `Message`. Formatted as the SDK's errors are.
fn failure(status: u16, headers: &Headers, body: &[u8]) -> AwsFailure {
    let document: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let text = |key: &str| document.get(key).and_then(serde_json::Value::as_str);
    let code = headers
        .get("x-amzn-errortype")
        .or_else(|| text("code"))
        .or_else(|| text("__type"))
        .map(|raw| {
            let raw = raw.split(':').next().unwrap_or(raw);
            raw.rsplit('#').next().unwrap_or(raw).trim().to_owned()
        })
        .filter(|code| !code.is_empty());
    let message = text("message").or_else(|| text("Message"));
    let message = match (&code, message) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.clone(),
        (None, Some(message)) => format!("HTTP {status}: {message}"),
        (None, None) => format!("HTTP {status}"),
    };
    AwsFailure { code, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(name.to_string(), value.to_string());
        }
        headers
    }

    #[test]
    fn labels_keep_arns_and_policy_names_inside_their_segment() {
        let invoke = Call::invoke(
            "arn:aws:lambda:eu-west-1:123456789012:function:attach",
            vec![],
        );
        assert_eq!(
            invoke.path,
            "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aeu-west-1%3A123456789012%3Afunction%3Aattach/invocations"
        );
        let attach = Call::attach_policy("stack-Iot+Policy=1,a@b", "eu-west-1:abc");
        assert_eq!(
            attach.path,
            "/target-policies/stack-Iot%2BPolicy%3D1%2Ca%40b"
        );
        assert_eq!(attach.body, br#"{"target":"eu-west-1:abc"}"#);
    }

    #[test]
    fn endpoints_follow_the_overrides_in_the_sdks_order_then_the_partition() {
        let none = |_: &str| None;
        assert_eq!(
            endpoint("iot", "eu-west-1", None, none),
            "https://iot.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            endpoint("lambda", "cn-north-1", None, none),
            "https://lambda.cn-north-1.amazonaws.com.cn"
        );
        let env = |name: &str| match name {
            "AWS_ENDPOINT_URL_LAMBDA" => Some("http://10.0.0.2:9000".to_owned()),
            "AWS_ENDPOINT_URL" => Some("http://10.0.0.3:5000".to_owned()),
            _ => None,
        };
        assert_eq!(
            endpoint("lambda", "eu-west-1", None, env),
            "http://10.0.0.2:9000"
        );
        assert_eq!(
            endpoint("iot", "eu-west-1", None, env),
            "http://10.0.0.3:5000"
        );
        assert_eq!(
            endpoint("lambda", "eu-west-1", Some("http://10.0.0.1:5000/"), env),
            "http://10.0.0.1:5000",
            "the daemon's own setting wins"
        );
    }

    #[test]
    fn refusals_carry_the_service_code_as_the_sdk_reported_it() {
        let denied = failure(
            403,
            &headers(&[(
                "x-amzn-ErrorType",
                "AccessDeniedException:http://internal.amazon.com/",
            )]),
            br#"{"Message":"not authorized","Type":"User"}"#,
        );
        assert_eq!(denied.code.as_deref(), Some("AccessDeniedException"));
        assert_eq!(denied.message, "AccessDeniedException: not authorized");
        assert!(!denied.is_transient());

        let throttled = failure(
            429,
            &headers(&[]),
            br#"{"__type":"com.amazonaws.iot#ThrottlingException","message":"slow down"}"#,
        );
        assert_eq!(throttled.code.as_deref(), Some("ThrottlingException"));
        assert!(throttled.is_transient());

        let gateway = failure(502, &headers(&[]), b"<html>bad gateway</html>");
        assert_eq!((gateway.code, gateway.message.as_str()), (None, "HTTP 502"));
    }

    /// The Authorization headers of `AttachPolicy` and `Invoke`, against botocore's `SigV4Auth` for the same
    /// request (tests/vectors/sigv4_headers.py): an independent implementation agrees.
    #[test]
    fn rest_calls_are_signed_as_botocore_signs_them() {
        let vector: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/vectors/sigv4_headers.json"))
                .expect("vector");
        for case in vector.as_array().expect("cases") {
            let field = |key: &str| case[key].as_str().expect(key).to_owned();
            let call = match field("operation").as_str() {
                "AttachPolicy" => Call::attach_policy(&field("policy"), &field("target")),
                _ => Call::invoke(&field("function"), field("payload").into_bytes()),
            };
            let credentials = AwsCredentials::for_test(
                &field("access_key_id"),
                &field("secret_access_key"),
                &field("session_token"),
                SystemTime::now() + Duration::from_secs(3600),
            );
            let time = humantime::parse_rfc3339(&field("time")).expect("time");
            let url = format!("{}{}", field("endpoint"), call.path);
            let request =
                signed_request(&call, &url, &field("region"), &credentials, time).expect("sign");
            assert_eq!(request.uri(), field("url"), "{}", field("operation"));
            assert_eq!(
                request.headers().get("authorization"),
                Some(field("authorization").as_str()),
                "{}",
                field("operation")
            );
            assert_eq!(
                request.headers().get("x-amz-security-token"),
                Some(field("session_token").as_str())
            );
        }
    }
}
