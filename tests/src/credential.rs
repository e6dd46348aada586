//! A typed builder for the McpCredentials the tests apply: it builds core's own types, so a renamed
//! or retyped CRD field breaks the test build instead of a test at run time.
//!
//! ```
//! use mcp_credentials_e2e::credential::{Credential, OAuth2, secret_key};
//!
//! let yaml = Credential::new(
//!     "github",
//!     "http://127.0.0.1:7001/mcp",
//!     OAuth2::client_credentials("cc-basic")
//!         .token_url("http://127.0.0.1:4000/token")
//!         .client_secret(secret_key("idp", "secret")),
//! )
//! .service_accounts(&["agent"])
//! .yaml();
//! assert!(yaml.contains("grant: clientCredentials"));
//! ```
//!
//! Only what the type system accepts can be built: specs the API server must refuse for their shape
//! (two sources, a missing required field) are written as YAML in the tests that check the refusal.

use std::collections::BTreeMap;

use mcp_credentials_core::{
    Access, ApiKeySource, BrowserSession, ClientAuth, CredentialSource, ExchangeGrant, FormLogin,
    GitHubAppSource, ImportedCookies, Inject, JwtAlgorithm, JwtSource, McpCredential, McpCredentialSpec,
    OAuth2Grant, OAuth2Source, Refresh, SecretKeyRef, ServiceAccountSubject, SessionCheck, SessionSource,
    SubjectToken, TokenExchangeSource,
};

/// The label that shards an operator watching every namespace onto one test's credentials
/// (`--selector mcpcredentials.dev/test-shard=<value>`), so other tests' credentials stay out.
pub const SHARD_LABEL: &str = "mcpcredentials.dev/test-shard";

/// A key in a Secret of the credential's namespace.
pub fn secret_key(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.into(),
        key: key.into(),
    }
}

/// An McpCredential under construction: a name, an upstream and a source, then what the test sets.
#[derive(Clone, Debug)]
pub struct Credential(McpCredential);

impl Credential {
    /// The credential `name` for `upstream`, from `source`; everything else at its default.
    pub fn new(name: &str, upstream: &str, source: impl Into<CredentialSource>) -> Self {
        Self(McpCredential::new(
            name,
            McpCredentialSpec {
                upstream: upstream.into(),
                source: source.into(),
                inject: None,
                refresh: None,
                secret_name: None,
                access: None,
            },
        ))
    }

    /// Adds the label `key: value` (the operator's `--selector` shards on labels).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.into(), value.into());
        self
    }

    /// `refresh.renewBeforePercentage`.
    pub fn renew_before_percentage(mut self, percentage: i32) -> Self {
        self.0.spec.refresh = Some(Refresh {
            renew_before_percentage: Some(percentage),
            ..Refresh::default()
        });
        self
    }

    /// `inject.header`, with the default format.
    pub fn header(mut self, header: &str) -> Self {
        self.0.spec.inject.get_or_insert_with(Inject::default).header = Some(header.into());
        self
    }

    /// `inject.format` (where `{token}` stands for the credential).
    pub fn format(mut self, format: &str) -> Self {
        self.0.spec.inject.get_or_insert_with(Inject::default).format = Some(format.into());
        self
    }

    /// `secretName`: the Secret the operator writes, instead of `<name>-mcp-credential`.
    pub fn secret_name(mut self, name: &str) -> Self {
        self.0.spec.secret_name = Some(name.into());
        self
    }

    /// `access.serviceAccounts`.
    pub fn service_accounts(mut self, names: &[&str]) -> Self {
        self.0
            .spec
            .access
            .get_or_insert_with(Access::default)
            .service_accounts = names.iter().map(|&n| n.into()).collect();
        self
    }

    /// `access.allServiceAccounts: true`.
    pub fn all_service_accounts(mut self) -> Self {
        self.0
            .spec
            .access
            .get_or_insert_with(Access::default)
            .all_service_accounts = Some(true);
        self
    }

    /// The McpCredential.
    pub fn build(self) -> McpCredential {
        self.0
    }

    /// The YAML document to `kubectl apply`.
    pub fn yaml(&self) -> String {
        serde_yaml::to_string(&self.0).expect("an McpCredential serializes")
    }
}

/// Several credentials as one YAML stream, for one `kubectl apply`.
pub fn yaml_stream(credentials: impl IntoIterator<Item = Credential>) -> String {
    credentials
        .into_iter()
        .map(|c| c.yaml())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// `source.oauth2`: a grant at a token endpoint.
#[derive(Clone, Debug)]
pub struct OAuth2(OAuth2Source);

impl OAuth2 {
    fn grant(grant: OAuth2Grant, client_id: &str) -> Self {
        Self(OAuth2Source {
            grant,
            token_url: None,
            client_id: client_id.into(),
            client_secret: None,
            client_auth: None,
            private_key: None,
            refresh_token: None,
            scopes: Vec::new(),
            resource: None,
            audience: None,
            extra_params: BTreeMap::new(),
            quirks: None,
            sign_in: None,
        })
    }

    /// The client credentials grant for `client_id` (token endpoint discovered unless set).
    pub fn client_credentials(client_id: &str) -> Self {
        Self::grant(OAuth2Grant::ClientCredentials, client_id)
    }

    /// The authorization code grant (a person signs in) with a client registered beforehand.
    pub fn authorization_code(client_id: &str) -> Self {
        Self::grant(OAuth2Grant::AuthorizationCode, client_id)
    }

    /// The authorization code grant with the client registering itself at sign-in (no `clientId`).
    pub fn sign_in() -> Self {
        Self::grant(OAuth2Grant::AuthorizationCode, "")
    }

    /// The refresh token grant for `client_id`, redeeming (and rotating) `refresh_token`.
    pub fn refresh_token(client_id: &str, refresh_token: SecretKeyRef) -> Self {
        let mut oauth2 = Self::grant(OAuth2Grant::RefreshToken, client_id);
        oauth2.0.refresh_token = Some(refresh_token);
        oauth2
    }

    /// `tokenUrl`.
    pub fn token_url(mut self, url: &str) -> Self {
        self.0.token_url = Some(url.into());
        self
    }

    /// `clientSecret`.
    pub fn client_secret(mut self, secret: SecretKeyRef) -> Self {
        self.0.client_secret = Some(secret);
        self
    }

    /// `privateKey`, for `privateKeyJwt`.
    pub fn private_key(mut self, key: SecretKeyRef) -> Self {
        self.0.private_key = Some(key);
        self
    }

    /// `clientAuth`.
    pub fn client_auth(mut self, auth: ClientAuth) -> Self {
        self.0.client_auth = Some(auth);
        self
    }

    /// `scopes`.
    pub fn scopes(mut self, scopes: &[&str]) -> Self {
        self.0.scopes = scopes.iter().map(|&s| s.into()).collect();
        self
    }
}

/// The clients of the tests' OAuth server (`tests/oauth-server/server.mjs`), their secrets where
/// the tests create them.
impl OAuth2 {
    /// `cc-basic`: client credentials, its secret in Secret `idp`, key `secret`.
    pub fn cc_basic() -> Self {
        Self::client_credentials("cc-basic").client_secret(secret_key("idp", "secret"))
    }

    /// `rt-client`: a rotating refresh token, it and the client secret in Secret `login` (keys
    /// `refresh-token`, `client-secret`).
    pub fn rt_client() -> Self {
        Self::refresh_token("rt-client", secret_key("login", "refresh-token"))
            .client_secret(secret_key("login", "client-secret"))
    }
}

/// `source.tokenExchange`: a subject token traded for an upstream token.
#[derive(Clone, Debug)]
pub struct TokenExchange(TokenExchangeSource);

impl TokenExchange {
    /// `grant` with a TokenRequest token of service account `name` for `audience` as the subject.
    pub fn service_account(grant: ExchangeGrant, name: &str, audience: &str) -> Self {
        Self(TokenExchangeSource {
            grant,
            token_url: None,
            client_id: None,
            client_secret: None,
            subject: SubjectToken {
                service_account: Some(ServiceAccountSubject {
                    name: name.into(),
                    audience: audience.into(),
                    expiration_seconds: None,
                }),
                secret_key_ref: None,
                token_type: None,
            },
            audience: None,
            scopes: Vec::new(),
            resource: None,
            requested_token_type: None,
            quirks: None,
            cross_app_access: None,
        })
    }

    /// `tokenUrl`.
    pub fn token_url(mut self, url: &str) -> Self {
        self.0.token_url = Some(url.into());
        self
    }

    /// `clientId`.
    pub fn client_id(mut self, client_id: &str) -> Self {
        self.0.client_id = Some(client_id.into());
        self
    }

    /// `scopes`.
    pub fn scopes(mut self, scopes: &[&str]) -> Self {
        self.0.scopes = scopes.iter().map(|&s| s.into()).collect();
        self
    }
}

/// `source.jwt`: a JWT the operator mints.
#[derive(Clone, Debug)]
pub struct Jwt(JwtSource);

impl Jwt {
    /// A JWT for `subject`, valid 15 minutes, signed with ES256 (the defaults).
    pub fn new(subject: &str) -> Self {
        Self(JwtSource {
            subject: subject.into(),
            audience: None,
            ttl: "15m".into(),
            algorithm: JwtAlgorithm::default(),
            claims: BTreeMap::new(),
        })
    }

    /// `algorithm`.
    pub fn algorithm(mut self, algorithm: JwtAlgorithm) -> Self {
        self.0.algorithm = algorithm;
        self
    }

    /// `ttl`.
    pub fn ttl(mut self, ttl: &str) -> Self {
        self.0.ttl = ttl.into();
        self
    }

    /// `audience` (default: the upstream).
    pub fn audience(mut self, audience: &str) -> Self {
        self.0.audience = Some(audience.into());
        self
    }

    /// Adds the claim `name: value`.
    pub fn claim(mut self, name: &str, value: &str) -> Self {
        self.0.claims.insert(name.into(), value.into());
        self
    }
}

/// `source.githubApp`: an installation token made from the App's key.
#[derive(Clone, Debug)]
pub struct GitHubApp(GitHubAppSource);

impl GitHubApp {
    /// Installation `installation_id` of App `app_id`, whose PEM key is `private_key`.
    pub fn new(app_id: &str, installation_id: i64, private_key: SecretKeyRef) -> Self {
        Self(GitHubAppSource {
            app_id: app_id.into(),
            installation_id,
            private_key,
            repositories: Vec::new(),
            permissions: BTreeMap::new(),
            api_url: None,
        })
    }

    /// `repositories`.
    pub fn repositories(mut self, names: &[&str]) -> Self {
        self.0.repositories = names.iter().map(|&n| n.into()).collect();
        self
    }

    /// Adds the permission `name: level`.
    pub fn permission(mut self, name: &str, level: &str) -> Self {
        self.0.permissions.insert(name.into(), level.into());
        self
    }

    /// `apiUrl`.
    pub fn api_url(mut self, url: &str) -> Self {
        self.0.api_url = Some(url.into());
        self
    }
}

/// `source.apiKey`: the key in `secret`.
pub fn api_key(secret: SecretKeyRef) -> CredentialSource {
    CredentialSource {
        api_key: Some(ApiKeySource {
            secret_key_ref: secret,
        }),
        ..CredentialSource::default()
    }
}

/// `source.session`: browser cookies, imported or from a form login.
#[derive(Clone, Debug)]
pub struct Session(SessionSource);

impl Session {
    fn with(cookies: Option<ImportedCookies>, form_login: Option<FormLogin>) -> Self {
        Self(SessionSource {
            cookies,
            form_login,
            browser: None,
            check: None,
        })
    }

    /// Cookies exported from a browser into `secret` (format detected).
    pub fn cookies(secret: SecretKeyRef) -> Self {
        Self::with(
            Some(ImportedCookies {
                secret_key_ref: secret,
                format: None,
            }),
            None,
        )
    }

    /// Cookies the browser extension sends (standalone mode), for `spec.upstream`'s site.
    pub fn browser() -> Self {
        let mut session = Self::with(None, None);
        session.0.browser = Some(BrowserSession::default());
        session
    }

    /// A form login posting to `url` with the user name and password from these Secret keys.
    pub fn form_login(url: &str, username: SecretKeyRef, password: SecretKeyRef) -> Self {
        Self::with(
            None,
            Some(FormLogin {
                url: url.into(),
                username,
                password,
                username_field: None,
                password_field: None,
                fields: BTreeMap::new(),
            }),
        )
    }

    /// The form login's field names for the user name and the password.
    pub fn form_fields(mut self, username: &str, password: &str) -> Self {
        let login = self
            .0
            .form_login
            .as_mut()
            .expect("form_fields is for a form login");
        login.username_field = Some(username.into());
        login.password_field = Some(password.into());
        self
    }

    /// `check`: GET `url` every `interval`; alive when it answers `expect_status` (default 200).
    pub fn check(mut self, url: &str, expect_status: Option<i32>, interval: &str) -> Self {
        self.0.check = Some(SessionCheck {
            url: url.into(),
            expect_status,
            interval: Some(interval.into()),
        });
        self
    }
}

/// Each source builder fills its one field of `spec.source`.
macro_rules! into_source {
    ($($builder:ident => $field:ident),* $(,)?) => {$(
        impl From<$builder> for CredentialSource {
            fn from(source: $builder) -> Self {
                Self { $field: Some(source.0), ..Self::default() }
            }
        }
    )*};
}

into_source!(
    OAuth2 => oauth2,
    TokenExchange => token_exchange,
    Jwt => jwt,
    GitHubApp => github_app,
    Session => session,
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The YAML as a JSON value, for comparisons that ignore layout.
    fn value(yaml: &str) -> serde_json::Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_built_credential_renders_the_yaml_a_person_would_write() {
        let built = Credential::new(
            "github",
            "https://api.githubcopilot.com/mcp/",
            api_key(secret_key("gh", "token")),
        )
        .label(SHARD_LABEL, "a")
        .header("X-API-Key")
        .format("{token}")
        .renew_before_percentage(50)
        .secret_name("github-token")
        .service_accounts(&["coding-agent"]);
        let by_hand = r#"apiVersion: mcpcredentials.dev/v1alpha1
kind: McpCredential
metadata: {name: github, labels: {mcpcredentials.dev/test-shard: a}}
spec:
  upstream: https://api.githubcopilot.com/mcp/
  source: {apiKey: {secretKeyRef: {name: gh, key: token}}}
  inject: {header: X-API-Key, format: "{token}"}
  refresh: {renewBeforePercentage: 50}
  secretName: github-token
  access: {serviceAccounts: [coding-agent]}
"#;
        assert_eq!(value(&built.yaml()), value(by_hand));
    }

    #[test]
    fn every_source_renders_its_fields() {
        let upstream = "http://127.0.0.1:7001/mcp";
        let yaml = yaml_stream([
            Credential::new(
                "cc",
                upstream,
                OAuth2::client_credentials("cc-jwt")
                    .token_url("http://127.0.0.1:4000/token")
                    .client_auth(ClientAuth::PrivateKeyJwt)
                    .private_key(secret_key("idp", "key")),
            ),
            Credential::new(
                "rt",
                upstream,
                OAuth2::refresh_token("rt-client", secret_key("login", "refresh-token"))
                    .client_secret(secret_key("login", "client-secret")),
            ),
            Credential::new(
                "te",
                upstream,
                TokenExchange::service_account(ExchangeGrant::JwtBearer, "agent", "https://idp")
                    .token_url("http://127.0.0.1:4000/token")
                    .client_id("wi-client")
                    .scopes(&["read"]),
            ),
            Credential::new(
                "jwt",
                upstream,
                Jwt::new("research")
                    .algorithm(JwtAlgorithm::RS256)
                    .ttl("5m")
                    .audience("https://other")
                    .claim("tenant", "acme"),
            ),
            Credential::new(
                "gh",
                upstream,
                GitHubApp::new("4242", 777, secret_key("app", "private-key.pem"))
                    .repositories(&["playground"])
                    .permission("contents", "read")
                    .api_url("http://127.0.0.1:4001"),
            ),
            Credential::new(
                "cookies",
                upstream,
                Session::cookies(secret_key("browser", "cookies.txt")).check(
                    "http://127.0.0.1:4002/check",
                    Some(200),
                    "1m",
                ),
            ),
            Credential::new(
                "form",
                upstream,
                Session::form_login(
                    "http://127.0.0.1:4002/login",
                    secret_key("login", "user"),
                    secret_key("login", "pass"),
                )
                .form_fields("user", "pass"),
            )
            .all_service_accounts(),
        ]);
        let specs: Vec<serde_json::Value> = yaml
            .split("---\n")
            .map(|doc| value(doc)["spec"].clone())
            .collect();
        let by_hand = [
            r#"{oauth2: {grant: clientCredentials, tokenUrl: "http://127.0.0.1:4000/token", clientId: cc-jwt,
                clientAuth: privateKeyJwt, privateKey: {name: idp, key: key}}}"#,
            r#"{oauth2: {grant: refreshToken, clientId: rt-client, clientSecret: {name: login, key: client-secret},
                refreshToken: {name: login, key: refresh-token}}}"#,
            r#"{tokenExchange: {grant: jwtBearer, tokenUrl: "http://127.0.0.1:4000/token", clientId: wi-client,
                subject: {serviceAccount: {name: agent, audience: "https://idp"}}, scopes: [read]}}"#,
            r#"{jwt: {subject: research, audience: "https://other", ttl: 5m, algorithm: RS256, claims: {tenant: acme}}}"#,
            r#"{githubApp: {appId: "4242", installationId: 777, privateKey: {name: app, key: private-key.pem},
                repositories: [playground], permissions: {contents: read}, apiUrl: "http://127.0.0.1:4001"}}"#,
            r#"{session: {cookies: {secretKeyRef: {name: browser, key: cookies.txt}},
                check: {url: "http://127.0.0.1:4002/check", expectStatus: 200, interval: 1m}}}"#,
            r#"{session: {formLogin: {url: "http://127.0.0.1:4002/login", username: {name: login, key: user},
                password: {name: login, key: pass}, usernameField: user, passwordField: pass}}}"#,
        ];
        assert_eq!(specs.len(), by_hand.len());
        for (spec, source) in specs.iter().zip(by_hand) {
            assert_eq!(spec["upstream"], upstream);
            assert_eq!(spec["source"], value(source), "{yaml}");
        }
        assert_eq!(specs[6]["access"], value("{allServiceAccounts: true}"));
    }

    #[test]
    fn jwt_defaults_are_the_crds() {
        let jwt: JwtSource = serde_json::from_value(serde_json::json!({"subject": "research"})).unwrap();
        assert_eq!(Jwt::new("research").0, jwt);
    }
}
