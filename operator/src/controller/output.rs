//! The Secret the operator writes: what it holds now ([`Current`]), and what it should hold.

use super::*;

/// The credential currently in the Secret, as the Secret describes it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Current {
    pub(super) not_before: SystemTime,
    pub(super) expires_at: Option<SystemTime>,
    pub(super) version: String,
    pub(super) inputs: String,
    pub(super) handled_request: Option<String>,
}

impl Current {
    pub(super) fn from_secret(s: &Secret) -> Option<Self> {
        let data = read_data(s)?;
        let ann = s.metadata.annotations.as_ref();
        let version = data.version.to_owned();
        let expires_at = data.expires_at;
        let not_before = ann
            .and_then(|a| a.get(ISSUED_AT_ANNOTATION))
            .and_then(|t| parse_time(t))?;
        Some(Self {
            not_before,
            expires_at,
            version,
            inputs: ann
                .and_then(|a| a.get(INPUTS_ANNOTATION))
                .cloned()
                .unwrap_or_default(),
            handled_request: ann.and_then(|a| a.get(REFRESH_REQUESTED_ANNOTATION)).cloned(),
        })
    }

    pub(super) fn valid_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// The header the credential's Secret serves: (name, value).
pub(super) fn served_header(s: &Secret) -> Option<(String, SecretString)> {
    let data = read_data(s)?;
    let (name, value) = data.headers.first()?;
    Some((
        (*name).to_owned(),
        SecretString::new(std::str::from_utf8(value).ok()?),
    ))
}

/// The credential in a Secret the operator wrote, read as the sidecar reads it (`None` when it is
/// not one).
pub(super) fn read_data(s: &Secret) -> Option<CredentialData<'_>> {
    let data = s.data.as_ref()?;
    CredentialData::from_entries(data.iter().map(|(k, v)| (k.as_str(), v.0.as_slice()))).ok()
}

pub(super) fn owned_by(s: &Secret, cred: &McpCredential) -> bool {
    let uid = cred.uid();
    s.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
}

pub(super) fn desired_secret(
    cred: &McpCredential,
    name: &str,
    issued: &Issued,
    fingerprint: &str,
    handled: Option<&str>,
) -> Secret {
    let (header, value) = source::header(&cred.spec, issued);
    // A new value for every credential: issue time in milliseconds, then the object's generation.
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let version = format!("{millis:x}-{}", cred.metadata.generation.unwrap_or(0));
    let data: BTreeMap<String, ByteString> = CredentialData {
        upstream: &cred.spec.upstream,
        headers: vec![(&header, value.expose().as_bytes())],
        expires_at: issued.expires_at,
        version: &version,
    }
    .to_data()
    .into_iter()
    .map(|(k, v)| (k, ByteString(v)))
    .collect();
    let mut annotations = BTreeMap::from([
        (ISSUED_AT_ANNOTATION.to_owned(), rfc3339(issued.not_before)),
        (INPUTS_ANNOTATION.to_owned(), fingerprint.to_owned()),
    ]);
    if let Some(h) = handled {
        annotations.insert(REFRESH_REQUESTED_ANNOTATION.to_owned(), h.to_owned());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: cred.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (CREDENTIAL_LABEL.to_owned(), cred.name_any()),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "mcpcredentials.dev/v1alpha1".into(),
                kind: "McpCredential".into(),
                name: cred.name_any(),
                uid: cred.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        type_: Some(SECRET_TYPE.to_owned()),
        data: Some(data),
        ..Default::default()
    }
}

pub(super) fn secret_version(s: &Secret) -> String {
    s.data
        .as_ref()
        .and_then(|d| d.get(VERSION_KEY))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

/// Scheme, host and port of a token URL: a bounded label without path or query.
pub(super) fn issuer_label(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "invalid".into(),
    }
}

pub(super) fn rfc3339(t: SystemTime) -> String {
    to_time(t).0.to_string()
}

pub(super) fn to_time(t: SystemTime) -> Time {
    Time(jiff::Timestamp::from_second(timing::unix_seconds(t) as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

pub(super) fn parse_time(s: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = s.parse().ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(ts.as_second()).ok()?))
}
