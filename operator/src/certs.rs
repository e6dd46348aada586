//! The webhook's self-managed certificates: a CA and a serving certificate kept in a Secret of the
//! operator's namespace, renewed when a third of their lifetime is left, with the webhooks'
//! `caBundle` (mutating and validating) patched *before* a new certificate is served. The bundle
//! keeps the previous CA until it expires, so a rotation never leaves the API server distrusting
//! the webhook.
//! (With cert-manager, the chart disables all of this.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    api::core::v1::Secret,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};
use mcp_credentials_core::secret::{MANAGED_BY, MANAGED_BY_LABEL};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tracing::{info, warn};

/// Field manager of the Secret and the caBundle patch.
const FIELD_MANAGER: &str = "mcp-credentials-webhook-certs";
/// The current CA certificate alone (the one that signs).
const CA_CERT_KEY: &str = "ca-signing.crt";
/// The current CA's private key.
const CA_KEY_KEY: &str = "ca.key";
/// The trust bundle: the current CA, then the previous one while it is still valid.
const BUNDLE_KEY: &str = "ca.crt";

/// What to manage, and for how long certificates live.
#[derive(Debug, Clone)]
pub struct SelfManaged {
    /// The Secret holding CA and serving certificate (`tls.crt`, `tls.key`, `ca.crt`).
    pub secret: String,
    /// Its namespace: the operator's.
    pub namespace: String,
    /// The MutatingWebhookConfiguration whose `caBundle` to keep current, and the
    /// ValidatingWebhookConfiguration of the same name when there is one.
    pub webhook_configuration: String,
    /// The webhook's Service; its DNS names go in the certificate.
    pub service: String,
    /// Lifetime of a CA.
    pub ca_validity: Duration,
    /// Lifetime of a serving certificate.
    pub cert_validity: Duration,
}

/// The certificate material as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// Serving certificate (PEM).
    pub tls_crt: String,
    /// Its key (PEM).
    pub tls_key: String,
    /// The signing CA (PEM).
    pub ca_crt: String,
    /// The CA's key (PEM).
    pub ca_key: String,
    /// The trust bundle (PEM, current CA first).
    pub bundle: String,
}

/// What a check decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Everything is valid for more than a third of its lifetime.
    Keep,
    /// The serving certificate is due; the CA is fine.
    NewCertificate,
    /// No usable CA, or the CA itself is due: a new CA (the old one stays in the bundle) and a new
    /// serving certificate.
    NewCa,
}

/// The `notBefore` and `notAfter` of the first certificate in `pem`.
pub fn validity(pem: &str) -> Option<(SystemTime, SystemTime)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let at = |t: x509_parser::time::ASN1Time| UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    Some((at(cert.validity().not_before), at(cert.validity().not_after)))
}

/// True when less than a third of the certificate's lifetime is left at `now`.
fn due(pem: &str, now: SystemTime) -> bool {
    let Some((from, to)) = validity(pem) else {
        return true;
    };
    let lifetime = to.duration_since(from).unwrap_or_default();
    let left = to.duration_since(now).unwrap_or_default();
    left < lifetime / 3
}

/// Decides what to renew.
pub fn plan(existing: Option<&Material>, now: SystemTime) -> Plan {
    let Some(m) = existing else { return Plan::NewCa };
    if KeyPair::from_pem(&m.ca_key).is_err() || due(&m.ca_crt, now) {
        return Plan::NewCa;
    }
    if KeyPair::from_pem(&m.tls_key).is_err() || due(&m.tls_crt, now) {
        return Plan::NewCertificate;
    }
    Plan::Keep
}

/// New material following `plan` (which must not be `Keep`), at `now`.
pub fn renew(
    existing: Option<&Material>,
    plan: Plan,
    config: &SelfManaged,
    now: SystemTime,
) -> anyhow::Result<Material> {
    let (ca_crt, ca_key, bundle) = match (plan, existing) {
        (Plan::NewCertificate, Some(m)) => (m.ca_crt.clone(), m.ca_key.clone(), m.bundle.clone()),
        _ => {
            let key = KeyPair::generate().context("generating the CA key")?;
            let mut params = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
            params
                .distinguished_name
                .push(DnType::CommonName, "mcp-credentials webhook CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            set_validity(&mut params, now, config.ca_validity);
            let cert = params.self_signed(&key).context("signing the CA")?;
            let mut bundle = cert.pem();
            // Keep the previous CA while certificates it signed may still be served.
            if let Some(old) = existing
                && validity(&old.ca_crt).is_some_and(|(_, to)| to > now)
            {
                bundle.push_str(&old.ca_crt);
            }
            (cert.pem(), key.serialize_pem(), bundle)
        }
    };
    let ca_key_pair = KeyPair::from_pem(&ca_key).context("reading the CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca_crt, ca_key_pair).context("reading the CA certificate")?;
    let key = KeyPair::generate().context("generating the serving key")?;
    let dns = vec![
        config.service.clone(),
        format!("{}.{}", config.service, config.namespace),
        format!("{}.{}.svc", config.service, config.namespace),
        format!("{}.{}.svc.cluster.local", config.service, config.namespace),
    ];
    let mut params = CertificateParams::new(dns).context("serving certificate parameters")?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{}.{}.svc", config.service, config.namespace),
    );
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    set_validity(&mut params, now, config.cert_validity);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the serving certificate")?;
    Ok(Material {
        tls_crt: cert.pem(),
        tls_key: key.serialize_pem(),
        ca_crt,
        ca_key,
        bundle,
    })
}

fn set_validity(params: &mut CertificateParams, now: SystemTime, validity: Duration) {
    // A minute of slack for clocks that lag ours.
    let from = now.checked_sub(Duration::from_secs(60)).unwrap_or(now);
    params.not_before = from.into();
    params.not_after = (now + validity).into();
}

fn read(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let get = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
    Some(Material {
        tls_crt: get("tls.crt")?,
        tls_key: get("tls.key")?,
        ca_crt: get(CA_CERT_KEY)?,
        ca_key: get(CA_KEY_KEY)?,
        bundle: get(BUNDLE_KEY)?,
    })
}

/// One check: renew what is due, patch the caBundle (first), then store the new certificate.
/// Also restores a caBundle that something else (a `helm upgrade`) changed.
pub async fn ensure(client: &Client, config: &SelfManaged, now: SystemTime) -> anyhow::Result<Plan> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let existing = secrets
        .get_opt(&config.secret)
        .await
        .context("reading the webhook certificate Secret")?;
    let current = existing.as_ref().and_then(read);
    let plan = plan(current.as_ref(), now);
    let material = match (plan, current) {
        (Plan::Keep, Some(m)) => m,
        (plan, current) => renew(current.as_ref(), plan, config, now)?,
    };
    patch_ca_bundle(client, config, &material.bundle).await?;
    if plan != Plan::Keep {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(config.secret.clone()),
                namespace: Some(config.namespace.clone()),
                labels: Some([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned())].into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(
                [
                    ("tls.crt", &material.tls_crt),
                    ("tls.key", &material.tls_key),
                    (CA_CERT_KEY, &material.ca_crt),
                    (CA_KEY_KEY, &material.ca_key),
                    (BUNDLE_KEY, &material.bundle),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
                .collect(),
            ),
            ..Secret::default()
        };
        secrets
            .patch(
                &config.secret,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .context("writing the webhook certificate Secret")?;
        let expires = validity(&material.tls_crt).and_then(|(_, to)| jiff::Timestamp::try_from(to).ok());
        info!(plan = ?plan, secret = %config.secret, expires = ?expires.map(|t| t.to_string()), "webhook certificate renewed");
    }
    Ok(plan)
}

async fn patch_ca_bundle(client: &Client, config: &SelfManaged, bundle: &str) -> anyhow::Result<()> {
    let wanted = ByteString(bundle.as_bytes().to_vec());
    let name = &config.webhook_configuration;
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = mutating
        .get(name)
        .await
        .with_context(|| format!("reading MutatingWebhookConfiguration {name}"))?;
    let stale = stale_bundles(
        current
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.as_ref()),
        &wanted,
    );
    patch_bundles(&mutating, name, stale, &wanted).await?;
    // The McpCredential webhook of the same name (the chart installs both); absent before it existed.
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let Some(current) = validating
        .get_opt(name)
        .await
        .with_context(|| format!("reading ValidatingWebhookConfiguration {name}"))?
    else {
        return Ok(());
    };
    let stale = stale_bundles(
        current
            .webhooks
            .iter()
            .flatten()
            .map(|w| w.client_config.ca_bundle.as_ref()),
        &wanted,
    );
    patch_bundles(&validating, name, stale, &wanted).await
}

/// The indexes of the webhooks whose caBundle is not `wanted`.
fn stale_bundles<'a>(
    bundles: impl Iterator<Item = Option<&'a ByteString>>,
    wanted: &ByteString,
) -> Vec<usize> {
    bundles
        .enumerate()
        .filter(|(_, b)| *b != Some(wanted))
        .map(|(i, _)| i)
        .collect()
}

/// Sets the caBundle of the webhooks at `stale` (one JSON patch), if any.
async fn patch_bundles<K>(
    api: &Api<K>,
    name: &str,
    stale: Vec<usize>,
    wanted: &ByteString,
) -> anyhow::Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if stale.is_empty() {
        return Ok(());
    }
    let ops: Vec<serde_json::Value> = stale
        .into_iter()
        .map(|i| serde_json::json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": wanted}))
        .collect();
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).context("caBundle patch")?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .with_context(|| format!("patching the caBundle of {name}"))?;
    info!(webhook = %name, "caBundle updated");
    Ok(())
}

/// Checks every `interval` (sooner when a certificate falls due) until the process ends.
pub async fn run(client: Client, config: SelfManaged, interval: Duration) {
    loop {
        if let Err(e) = ensure(&client, &config, SystemTime::now()).await {
            warn!(
                error = format!("{e:#}"),
                "webhook certificates not ensured; retrying"
            );
            tokio::time::sleep(Duration::from_secs(10)).await;
            continue;
        }
        // A third of a certificate's life is the renewal window: checking at a tenth of it is early enough.
        tokio::time::sleep(
            interval
                .min(config.cert_validity / 10)
                .max(Duration::from_secs(1)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SelfManaged {
        SelfManaged {
            secret: "webhook-tls".into(),
            namespace: "mcp".into(),
            webhook_configuration: "mcp-credentials".into(),
            service: "mcp-credentials-webhook".into(),
            ca_validity: Duration::from_secs(365 * 86400),
            cert_validity: Duration::from_secs(90 * 86400),
        }
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn nothing_stored_means_a_new_ca_and_certificate() {
        let now = SystemTime::now();
        assert_eq!(plan(None, now), Plan::NewCa);
        let m = renew(None, Plan::NewCa, &config(), now).unwrap();
        assert_eq!(plan(Some(&m), now), Plan::Keep);
        let (_, to) = validity(&m.tls_crt).unwrap();
        assert!(to > now + 89 * DAY && to <= now + 90 * DAY);
        assert_eq!(m.bundle, m.ca_crt, "a first CA is the whole bundle");
    }

    #[test]
    fn the_certificate_is_renewed_when_a_third_of_its_life_is_left_and_the_ca_is_kept() {
        let now = SystemTime::now();
        let m = renew(None, Plan::NewCa, &config(), now).unwrap();
        assert_eq!(plan(Some(&m), now + 59 * DAY), Plan::Keep);
        assert_eq!(plan(Some(&m), now + 61 * DAY), Plan::NewCertificate);
        let next = renew(Some(&m), Plan::NewCertificate, &config(), now + 61 * DAY).unwrap();
        assert_eq!(next.ca_crt, m.ca_crt);
        assert_ne!(next.tls_crt, m.tls_crt);
        assert_eq!(plan(Some(&next), now + 61 * DAY), Plan::Keep);
    }

    #[test]
    fn a_new_ca_keeps_the_old_one_in_the_bundle_until_it_expires() {
        let now = SystemTime::now();
        let m = renew(None, Plan::NewCa, &config(), now).unwrap();
        let later = now + 250 * DAY;
        assert_eq!(plan(Some(&m), later), Plan::NewCa);
        let next = renew(Some(&m), Plan::NewCa, &config(), later).unwrap();
        assert_ne!(next.ca_crt, m.ca_crt);
        assert!(next.bundle.starts_with(&next.ca_crt) && next.bundle.ends_with(&m.ca_crt));
        let after_expiry = renew(Some(&m), Plan::NewCa, &config(), now + 400 * DAY).unwrap();
        assert_eq!(
            after_expiry.bundle, after_expiry.ca_crt,
            "an expired CA leaves the bundle"
        );
    }

    #[test]
    fn the_serving_certificate_chains_to_the_ca_for_the_service_names() {
        let m = renew(None, Plan::NewCa, &config(), SystemTime::now()).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(m.tls_crt.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(m.ca_crt.as_bytes()).unwrap();
        let ca = ca_pem.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        cert.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
        let sans = format!(
            "{:?}",
            cert.subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
        );
        assert!(sans.contains("mcp-credentials-webhook.mcp.svc"), "{sans}");
    }

    #[test]
    fn garbage_in_the_secret_means_a_fresh_start() {
        let now = SystemTime::now();
        let m = renew(None, Plan::NewCa, &config(), now).unwrap();
        let broken = Material {
            ca_key: "not a key".into(),
            ..m.clone()
        };
        assert_eq!(plan(Some(&broken), now), Plan::NewCa);
        let broken = Material {
            tls_crt: "not a certificate".into(),
            ..m
        };
        assert_eq!(plan(Some(&broken), now), Plan::NewCertificate);
    }
}
