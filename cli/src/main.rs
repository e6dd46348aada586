//! `kubectl mcpcred`: the person's side of sign-in credentials in a cluster.
//! - `kubectl mcpcred login <name> [-n <namespace>]` runs the sign-in on this machine (a browser
//!   here, or `--device`) and writes the credential's sign-in Secret with the person's own
//!   kubeconfig, so their RBAC decides; the operator, the single writer from then on, takes over.
//! - `kubectl mcpcred status [-n <namespace>]` lists each McpCredential: ready or not, why, and
//!   what to do (the exact command for one that needs a sign-in).

use std::{collections::BTreeMap, process::ExitCode};

use clap::{Parser, Subcommand};
use k8s_openapi::{
    ByteString,
    api::{
        authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
        core::v1::Secret,
    },
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
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
    let Some(cred) = creds
        .get_opt(name)
        .await
        .map_err(|e| format!("reading McpCredential {ns}/{name}: {e}"))?
    else {
        return Err(no_such_credential(&creds, ns, name).await);
    };
    let o = cred
        .spec
        .source
        .oauth2
        .as_ref()
        .filter(|_| sign_in::applies(&cred.spec))
        .ok_or_else(|| {
            format!(
                "McpCredential {ns}/{name} ({}): {}",
                mcp_credentials_core::source::kind(&cred.spec),
                sign_in::SignInError::NotSignIn
            )
        })?;
    let secret_name = sign_in::secret_name(name, o);
    // Asked before the sign-in: a sign-in that cannot be stored would leave a grant (and its
    // refresh token) at the authorization server that nobody holds.
    let may_get = may(&client, ns, &secret_name, "get").await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let existing = if may_get {
        secrets
            .get_opt(&secret_name)
            .await
            .map_err(|e| format!("reading Secret {ns}/{secret_name}: {e}"))?
    } else {
        None
    };
    let mut missing = Vec::new();
    if !may_get {
        missing.push("get");
    }
    // Server-side apply creates the Secret (create) or changes it (patch).
    if existing.is_none() && !may(&client, ns, &secret_name, "create").await? {
        missing.push("create");
    }
    if !may(&client, ns, &secret_name, "patch").await? {
        missing.push("patch");
    }
    if !missing.is_empty() {
        return Err(format!(
            "you may not {} Secret {ns}/{secret_name}, where the sign-in of McpCredential {name} is stored: ask for \
             a Role in namespace {ns} that allows get, create and patch on secrets (it may name only this Secret), \
             bound to you. Nothing was signed in or written",
            missing.join(", ")
        ));
    }
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

/// Whether the person may `verb` the Secret `name` of `ns`: the API server's answer to a
/// SelfSubjectAccessReview, so the same RBAC decides as for the request itself.
async fn may(client: &Client, ns: &str, name: &str, verb: &str) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.into()),
                verb: Some(verb.into()),
                resource: Some("secrets".into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("asking the API server whether you may {verb} Secret {ns}/{name}: {e}"))?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The error for a credential that does not exist: the names there are, when the person may list them.
async fn no_such_credential(creds: &Api<McpCredential>, ns: &str, name: &str) -> String {
    let there = match creds.list(&Default::default()).await {
        Ok(l) if l.items.is_empty() => " (it has none)".to_owned(),
        Ok(l) => {
            let mut names: Vec<String> = l.items.iter().map(ResourceExt::name_any).collect();
            names.sort();
            format!(" (it has: {})", names.join(", "))
        }
        Err(_) => String::new(),
    };
    format!(
        "there is no McpCredential {name:?} in namespace {ns:?}{there}: check the name, and -n for the namespace"
    )
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
