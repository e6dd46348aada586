//! `mcp-credentials-sidecar login <credential> <mcpcredentials.yaml> <secrets-dir>`: signs a
//! person in for one `authorizationCode` credential of standalone mode (core's
//! [`sign_in::login`]) and writes what the sign-in gives into the secrets directory, where a running
//! standalone sidecar picks it up at once (it watches the directory).

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use kube::ResourceExt;
use mcp_credentials_core::source::{
    OutboundPolicy, SecretResolver, SourceContext,
    sign_in::{
        self, Options, Registrations, SignInError, SignedIn,
        step_up::{self, StepUp},
    },
};

use crate::store::standalone::{self, write_private_file};

/// How the command is used.
pub const USAGE: &str = "usage: mcp-credentials-sidecar login <credential-name> <mcpcredentials.yaml> <secrets-dir> \
                         [--browser-command <cmd>] [--device] [--client-metadata-url <https-url>]";

/// The command that signs `credential` in, as messages show it.
pub fn command(credential: &str, credentials_file: &Path, secrets_dir: &Path) -> String {
    format!(
        "mcp-credentials-sidecar login {credential} {} {}",
        credentials_file.display(),
        secrets_dir.display()
    )
}

/// The parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Args {
    /// The credential's `metadata.name`.
    pub credential: String,
    /// The McpCredential YAML.
    pub credentials_file: PathBuf,
    /// The secrets directory.
    pub secrets_dir: PathBuf,
    /// Opens the URL (`<cmd> <url>`); default `xdg-open`.
    pub browser_command: Option<String>,
    /// The device grant instead.
    pub device: bool,
    /// Overrides `oauth2.signIn.clientMetadataUrl`.
    pub client_metadata_url: Option<String>,
}

impl Args {
    /// Parses the arguments after `login`.
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let mut positional = Vec::new();
        let (mut browser_command, mut device, mut client_metadata_url) = (None, false, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--device" => device = true,
                "--browser-command" => {
                    browser_command = Some(it.next().ok_or("--browser-command needs a command")?.clone());
                }
                "--client-metadata-url" => {
                    client_metadata_url = Some(it.next().ok_or("--client-metadata-url needs a URL")?.clone());
                }
                f if f.starts_with("--") => return Err(format!("unknown option {f:?}; {USAGE}")),
                _ => positional.push(a.clone()),
            }
        }
        let [credential, file, dir] = <[String; 3]>::try_from(positional).map_err(|_| USAGE.to_owned())?;
        Ok(Args {
            credential,
            credentials_file: file.into(),
            secrets_dir: dir.into(),
            browser_command,
            device,
            client_metadata_url,
        })
    }
}

/// Why `login` failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The credentials file could not be read.
    #[error(transparent)]
    Load(#[from] standalone::StandaloneError),
    /// No credential of that name.
    #[error("{file} has no McpCredential named {name:?} (it has: {names})")]
    NoSuchCredential {
        /// The file.
        file: String,
        /// The name asked for.
        name: String,
        /// The names it has.
        names: String,
    },
    /// Signing in failed.
    #[error(transparent)]
    SignIn(#[from] SignInError),
    /// The HTTP clients could not be built.
    #[error("cannot build the HTTP clients: {0}")]
    Http(#[from] reqwest::Error),
    /// A file could not be read or written.
    #[error("{what} {}: {source}; nothing else was changed", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Starts the sign-in of `credential` for the status page's button: the login runs on in the
/// background (it waits for the browser's redirect, then stores what it gets, which the running
/// sidecar picks up); the answer is the authorization URL to send the browser to, or why the
/// sign-in could not start.
pub fn start_from_page(
    credential: String,
    credentials_file: PathBuf,
    secrets_dir: PathBuf,
    policy: OutboundPolicy,
) -> crate::admin::Started {
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<String, String>>();
    let tx = std::sync::Arc::new(std::sync::Mutex::new(Some(tx)));
    let send = {
        let tx = tx.clone();
        move |answer: Result<String, String>| {
            if let Some(tx) = tx.lock().expect("sign-in answer").take() {
                let _ = tx.send(answer);
            }
        }
    };
    let args = Args {
        credential,
        credentials_file,
        secrets_dir,
        browser_command: None,
        device: false,
        client_metadata_url: None,
    };
    tokio::spawn(async move {
        let early = send.clone();
        let result = run_with(&args, policy, move |p| match p {
            sign_in::Prompt::Browser { url } => early(Ok(url.clone())),
            sign_in::Prompt::Device { .. } => early(Err("the server asked for the device grant".into())),
        })
        .await;
        match result {
            Ok(s) => {
                tracing::info!(credential = %args.credential, issuer = %s.issuer, "signed in from the status page")
            }
            Err(e) => {
                tracing::warn!(credential = %args.credential, error = %e, "the sign-in started from the status page failed");
                send(Err(e.to_string()));
            }
        }
    });
    Box::pin(async move {
        rx.await
            .unwrap_or_else(|_| Err("the sign-in ended before it had a URL to open".into()))
    })
}

/// Runs `login` with the arguments after the subcommand; prints progress and the outcome.
pub async fn main(args: &[String], policy: OutboundPolicy) -> ExitCode {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mcp-credentials-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&args, policy).await {
        Ok(signed_in) => {
            println!(
                "Signed in to {} for {:?}: stored in {} (the running sidecar uses it at once).",
                signed_in.issuer,
                args.credential,
                args.secrets_dir.display()
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mcp-credentials-sidecar login {}: {e}", args.credential);
            ExitCode::FAILURE
        }
    }
}

/// Signs in and stores the result, showing the prompt on stderr and opening the browser.
pub async fn run(args: &Args, policy: OutboundPolicy) -> Result<SignedIn, LoginError> {
    let browser = args.browser_command.clone();
    run_with(args, policy, |p| p.show(browser.as_deref())).await
}

/// Signs in and stores the result; `prompt` is given what the person must open (the status page's
/// sign-in sends their browser there).
pub async fn run_with(
    args: &Args,
    policy: OutboundPolicy,
    prompt: impl FnOnce(&sign_in::Prompt),
) -> Result<SignedIn, LoginError> {
    let credentials = standalone::load(&args.credentials_file)?;
    let credential = credentials
        .iter()
        .find(|c| c.name_any() == args.credential)
        .ok_or_else(|| LoginError::NoSuchCredential {
            file: args.credentials_file.display().to_string(),
            name: args.credential.clone(),
            names: credentials
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let o = credential
        .spec
        .source
        .oauth2
        .as_ref()
        .filter(|_| sign_in::applies(&credential.spec))
        .ok_or(SignInError::NotSignIn)?;
    let dir = args.secrets_dir.join(sign_in::secret_name(&args.credential, o));
    let existing = read_registrations(&dir)?;
    let files = standalone::SecretFiles::new(args.secrets_dir.clone());
    let client_secret = match &o.client_secret {
        Some(r) => Some(files.get(r).await.map_err(SignInError::Secret)?),
        None => None,
    };
    let ctx = SourceContext::new(std::time::Duration::from_secs(15), policy)?;
    let options = Options {
        device: args.device,
        client_metadata_url: args.client_metadata_url.clone(),
        timeout: None,
        // A step-up the sidecar recorded (403 insufficient_scope): its scopes are asked for too.
        step_up: read_step_up(&dir)?,
    };
    let signed_in = sign_in::login(&ctx, &credential.spec, existing, client_secret, &options, prompt).await?;
    store(&dir, &signed_in)?;
    Ok(signed_in)
}

/// The registrations stored so far in the sign-in directory, if any.
fn read_registrations(dir: &Path) -> Result<Option<Registrations>, LoginError> {
    let path = dir.join(sign_in::REGISTRATION_KEY);
    match std::fs::read_to_string(&path) {
        Ok(text) => Registrations::parse(&text)
            .map(Some)
            .map_err(|e| SignInError::Stored(format!("{}: {e}", path.display())).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoginError::File {
            what: "cannot read",
            path,
            source,
        }),
    }
}

/// The step-up the running sidecar recorded in the sign-in directory, if any.
fn read_step_up(dir: &Path) -> Result<Option<StepUp>, LoginError> {
    let path = dir.join(step_up::STEP_UP_KEY);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            StepUp::parse(&text).map_err(|e| SignInError::Stored(format!("{}: {e}", path.display())).into())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoginError::File {
            what: "cannot read",
            path,
            source,
        }),
    }
}

/// Writes the sign-in's files, each atomically at 0600 in a 0700 directory: the registration
/// and the settled step-up first, the refresh token last (its arrival is what a running sidecar acts on).
pub fn store(dir: &Path, signed_in: &SignedIn) -> Result<(), LoginError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let file_error = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LoginError::File { what, path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(file_error("cannot create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(file_error("cannot restrict", dir))?;
    let mut data: Vec<_> = signed_in
        .data()
        .into_iter()
        .chain(signed_in.step_up_data())
        .collect();
    // The settled step-up first, so the sidecar never reads the new token beside a pending one.
    data.sort_by_key(|(k, _)| (*k != step_up::STEP_UP_KEY, *k == sign_in::REFRESH_TOKEN_KEY));
    for (key, value) in data {
        let path = dir.join(key);
        write_private_file(&path, value.expose().as_bytes()).map_err(file_error("cannot write", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_command_line_takes_three_names_and_the_options_anywhere() {
        let a = Args::parse(&args(&[
            "notion",
            "c.yaml",
            "s",
            "--device",
            "--browser-command",
            "curl -L",
        ]))
        .unwrap();
        assert_eq!(a.credential, "notion");
        assert!(a.device);
        assert_eq!(a.browser_command.as_deref(), Some("curl -L"));
        assert!(
            Args::parse(&args(&["notion", "c.yaml"]))
                .unwrap_err()
                .starts_with("usage:")
        );
        assert!(
            Args::parse(&args(&["a", "b", "c", "--nope"]))
                .unwrap_err()
                .contains("--nope")
        );
        assert!(Args::parse(&args(&["a", "b", "c", "--browser-command"])).is_err());
    }
}
