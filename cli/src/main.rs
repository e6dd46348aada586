//! `kubectl mcpcred`: the person's side of sign-in credentials in a cluster.
//! - `kubectl mcpcred login <name> [-n <namespace>]` runs the sign-in on this machine (a browser
//!   here, or `--device`) and writes the credential's sign-in Secret with the person's own
//!   kubeconfig, so their RBAC decides; the operator, the single writer from then on, takes over.
//! - `kubectl mcpcred status [-n <namespace>]` lists each McpCredential: ready or not, why, and
//!   what to do (the exact command for one that needs a sign-in).

use std::{collections::BTreeMap, process::ExitCode};

use clap::{Parser, Subcommand};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use mcp_credentials_core::{
    McpCredential,
    source::{
        OutboundPolicy, SourceContext,
        sign_in::{
            self, Options, Registrations,
            step_up::{self, StepUp},
        },
    },
};

/// The field manager of the sign-in Secret's data.
const FIELD_MANAGER: &str = "kubectl-mcpcred";

#[derive(Parser)]
#[command(
    name = "kubectl mcpcred",
    version,
    about = "Sign in McpCredentials and see why one is not ready"
)]
struct Cli {
    /// The namespace. Default: the kubeconfig context's.
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sign in for the McpCredential NAME (grant authorizationCode) and store the result in its Secret.
    Login {
        /// The McpCredential.
        name: String,
        /// Opens the URL: `<cmd> <url>`. Default: xdg-open.
        #[arg(long)]
        browser_command: Option<String>,
        /// The device authorization grant (RFC 8628): sign in on another device.
        #[arg(long)]
        device: bool,
        /// The client's Client ID Metadata Document URL (overrides oauth2.signIn.clientMetadataUrl).
        #[arg(long)]
        client_metadata_url: Option<String>,
        /// Let discovered URLs point at loopback addresses (an authorization server on this machine).
        #[arg(long, env = "MCPCRED_DISCOVERY_ALLOW_LOOPBACK")]
        allow_loopback: bool,
    },
    /// Every McpCredential of the namespace: ready or not, why, what to do.
    Status,
}

fn main() -> ExitCode {
    mcp_credentials_core::process::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl mcpcred: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot use the kubeconfig: {e}"))?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    match cli.command {
        Command::Login {
            name,
            browser_command,
            device,
            client_metadata_url,
            allow_loopback,
        } => {
            let options = Options {
                device,
                client_metadata_url,
                timeout: None,
                step_up: None,
            };
            login(
                client,
                &ns,
                &name,
                browser_command.as_deref(),
                &options,
                allow_loopback,
            )
            .await
        }
        Command::Status => status(client, &ns).await,
    }
}

async fn login(
    client: Client,
    ns: &str,
    name: &str,
    browser: Option<&str>,
    options: &Options,
    allow_loopback: bool,
) -> Result<(), String> {
    let creds: Api<McpCredential> = Api::namespaced(client.clone(), ns);
    let cred = creds
        .get_opt(name)
        .await
        .map_err(|e| format!("reading McpCredential {ns}/{name}: {e}"))?
        .ok_or_else(|| format!("there is no McpCredential {name:?} in namespace {ns:?}"))?;
    let o = cred
        .spec
        .source
        .oauth2
        .as_ref()
        .filter(|_| sign_in::applies(&cred.spec))
        .ok_or_else(|| sign_in::SignInError::NotSignIn.to_string())?;
    let secret_name = sign_in::secret_name(name, o);
    let secrets: Api<Secret> = Api::namespaced(client, ns);
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|e| format!("reading Secret {ns}/{secret_name} (your RBAC must allow get): {e}"))?;
    let value = |s: &Secret, key: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| String::from_utf8_lossy(&b.0).trim_end().to_owned())
    };
    let registrations = match existing
        .as_ref()
        .and_then(|s| value(s, sign_in::REGISTRATION_KEY))
    {
        Some(text) => Some(Registrations::parse(&text).map_err(|e| format!("Secret {secret_name}: {e}"))?),
        None => None,
    };
    // A step-up the operator recorded (403 insufficient_scope): this sign-in asks for its scopes too.
    let step_up = match existing.as_ref().and_then(|s| value(s, step_up::STEP_UP_KEY)) {
        Some(text) => StepUp::parse(&text).map_err(|e| format!("Secret {secret_name}: {e}"))?,
        None => None,
    };
    let options = &Options {
        step_up,
        ..options.clone()
    };
    let client_secret = match &o.client_secret {
        Some(r) => {
            let s = secrets
                .get(&r.name)
                .await
                .map_err(|e| format!("reading the client secret {ns}/{}: {e}", r.name))?;
            Some(
                value(&s, &r.key)
                    .ok_or_else(|| format!("Secret {} has no key {:?}", r.name, r.key))?
                    .into(),
            )
        }
        None => None,
    };
    let ctx = SourceContext::new(
        std::time::Duration::from_secs(15),
        OutboundPolicy { allow_loopback },
    )
    .map_err(|e| format!("cannot build the HTTP clients: {e}"))?;
    let signed_in = sign_in::login(&ctx, &cred.spec, registrations, client_secret, options, |p| {
        p.show(browser)
    })
    .await
    .map_err(|e| e.to_string())?;
    // One write of both keys, with the person's own rights.
    let data: BTreeMap<String, ByteString> = signed_in
        .data()
        .into_iter()
        .chain(signed_in.step_up_data())
        .map(|(k, v)| (k.to_owned(), ByteString(v.expose().as_bytes().to_vec())))
        .collect();
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": secret_name,
            "labels": { "app.kubernetes.io/managed-by": FIELD_MANAGER, "mcpcredentials.dev/sign-in-for": name },
        },
        "type": "Opaque",
        "data": data,
    });
    secrets
        .patch(&secret_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(secret))
        .await
        .map_err(|e| {
            format!(
                "signed in, but writing Secret {ns}/{secret_name} failed (your RBAC must allow create and patch \
                 on it): {e}; nothing was stored, run the command again once you may"
            )
        })?;
    println!(
        "Signed in to {} for {ns}/{name}: stored in Secret {secret_name}. The operator takes over from here \
         (kubectl mcpcred status -n {ns}).",
        signed_in.issuer
    );
    if let Some(h) = &signed_in.held {
        println!(
            "The authorization server issued no refresh token: its access token is served until{}, then this \
                 credential asks for a new sign-in.",
            h.expires_at
                .map(|e| format!(
                    " shortly before it expires at {}",
                    mcp_credentials_core::secret::rfc3339_seconds(e)
                ))
                .unwrap_or_else(|| " an hour from now".into())
        );
    }
    Ok(())
}

async fn status(client: Client, ns: &str) -> Result<(), String> {
    let creds: Api<McpCredential> = Api::namespaced(client, ns);
    let list = creds
        .list(&Default::default())
        .await
        .map_err(|e| format!("listing McpCredentials in {ns}: {e}"))?;
    if list.items.is_empty() {
        println!("No McpCredentials in namespace {ns}.");
    }
    for c in list.items {
        let conditions = c
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let find = |t: &str| conditions.iter().find(|x| x.type_ == t);
        let ready = find("Ready");
        let state = match ready {
            Some(r) if r.status == "True" => "ready".to_owned(),
            Some(r) => format!("not ready ({})", r.reason),
            None => "not reconciled yet (is the operator running?)".to_owned(),
        };
        println!("{}  {state}", c.name_any());
        println!("  source:   {}", mcp_credentials_core::source::kind(&c.spec));
        println!("  upstream: {}", c.spec.upstream);
        if let Some(t) = c.status.as_ref().and_then(|s| s.not_after.as_ref()) {
            println!("  expires:  {}", t.0);
        }
        if let Some(r) = ready.filter(|r| r.status != "True") {
            println!("  why:      {}", r.message);
        }
        if let Some(r) = find("ReauthRequired").filter(|r| r.status == "True") {
            let todo = if r.reason == "SignInRequired" {
                format!("kubectl mcpcred login {} -n {ns}", c.name_any())
            } else {
                r.message.clone()
            };
            println!("  to do:    {todo}");
        }
    }
    Ok(())
}
