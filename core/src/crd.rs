//! The `McpCredential` custom resource. Every `///` here becomes `kubectl explain` text, so it is
//! written for the person writing the YAML and states each default.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{MAX_URL_LENGTH, duration_between, https_url, object_name};

/// A credential for one upstream MCP server, kept fresh by the operator in a Secret that the sidecar
/// reads. The operator obtains the credential from `spec.source`, renews it before it expires and
/// writes the exact header value to send into the Secret named by `spec.secretName`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mcpcredentials.dev",
    version = "v1alpha1",
    kind = "McpCredential",
    plural = "mcpcredentials",
    shortname = "mcpcred",
    category = "mcp",
    namespaced,
    status = "McpCredentialStatus",
    doc = "A credential for one upstream MCP server, kept fresh by the mcp-credentials operator in a Secret \
           that the mcp-credentials sidecar attaches to every request to that server.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.source"),
    printcolumn(name = "Upstream", type_ = "string", json_path = ".spec.upstream"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.notAfter"),
    printcolumn(name = "Renewal", type_ = "date", json_path = ".status.renewalTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(name = "Secret", type_ = "string", json_path = ".status.secretName", priority = "1"),
    validation = Rule::new("has(self.spec.secretName) || size(self.metadata.name) <= 238").message(
        "metadata.name is too long for the default Secret name '<name>-mcp-credential' (at most 253 \
         characters): set spec.secretName or use a shorter name"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct McpCredentialSpec {
    /// The URL of the upstream MCP server, for example `https://mcp.example.com/mcp`. The sidecar
    /// forwards `http://127.0.0.1:<port>/<credential-name>/<rest>` to `<upstream>/<rest>`. It is also
    /// the default RFC 8707 `resource` and token audience. Must be https (http only to loopback).
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("spec.upstream"))]
    pub upstream: String,

    /// Where the credential comes from. Set exactly one of `oauth2`, `tokenExchange`, `jwt`,
    /// `githubApp`, `apiKey` or `session`.
    pub source: CredentialSource,

    /// How the credential is attached to requests. The default depends on the source:
    /// `Authorization: Bearer {token}` for tokens, `Cookie: {token}` for sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<Inject>,

    /// When to renew. Default: when 1/3 of the credential's real lifetime is left (at 2/3 of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<Refresh>,

    /// The Secret the operator writes the credential to, in this namespace. Default:
    /// `<metadata.name>-mcp-credential`. The operator refuses to overwrite a Secret it does not own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = object_name("spec.secretName"))]
    pub secret_name: Option<String>,

    /// Who may use this credential (read its Secret, be injected with it, report on it). Default:
    /// nobody until `access.serviceAccounts` lists the agents' service accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
}

/// Which service accounts may use a credential, as `spec.access` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed<'a> {
    /// No `access` (or an empty list): nobody. The safe default: a credential is usable only by
    /// the service accounts its author names.
    Nobody,
    /// Exactly these service accounts of the credential's namespace.
    Listed(&'a [String]),
    /// `access.allServiceAccounts: true`: every service account of the namespace.
    Namespace,
}

impl Allowed<'_> {
    /// Whether pods running as `service_account` (of the credential's namespace) may use it.
    pub fn permits(&self, service_account: &str) -> bool {
        match self {
            Self::Nobody => false,
            Self::Listed(names) => names.iter().any(|n| n == service_account),
            Self::Namespace => true,
        }
    }
}

impl std::fmt::Display for Allowed<'_> {
    /// How a refusal describes the policy: `no service account (spec.access.serviceAccounts is
    /// empty)`, `only ["a", "b"]`, `every service account of the namespace`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nobody => write!(f, "no service account yet (spec.access.serviceAccounts is empty)"),
            Self::Listed(names) => write!(f, "only {names:?} (spec.access.serviceAccounts)"),
            Self::Namespace => write!(f, "every service account of the namespace"),
        }
    }
}

impl McpCredentialSpec {
    /// The service accounts allowed to use the credential.
    pub fn allowed(&self) -> Allowed<'_> {
        match &self.access {
            Some(a) if a.all_service_accounts == Some(true) => Allowed::Namespace,
            Some(a) if !a.service_accounts.is_empty() => Allowed::Listed(&a.service_accounts),
            _ => Allowed::Nobody,
        }
    }
}

/// Where the credential comes from: exactly one of the fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.oauth2), has(self.tokenExchange), has(self.jwt), has(self.githubApp), has(self.apiKey), \
     has(self.session)].filter(x, x).size() == 1"
).message(
    "spec.source must set exactly one of oauth2, tokenExchange, jwt, githubApp, apiKey or session"
))]
pub struct CredentialSource {
    /// An OAuth 2.0 access token from a token endpoint: the client credentials grant, or a refresh
    /// token that the operator redeems (and stores again when the server rotates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2Source>,

    /// A token obtained by RFC 8693 token exchange or the RFC 7523 JWT-bearer grant, from a
    /// service-account token (workload identity, no stored secret) or a token in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_exchange: Option<TokenExchangeSource>,

    /// A JWT minted and signed by the operator itself, audience-bound to the upstream and bound to
    /// this namespace. One issuer signs for every namespace, so an upstream validating with the
    /// operator's JWKS (`<issuer>/.well-known/jwks.json`) checks: the signature, `iss` (the operator's
    /// issuer), `aud` (its own URL), `exp`, and that the claim `mcpcredentials.dev/namespace` is a
    /// namespace allowed to call it (always set; `sub` is `mcpcred:<namespace>:<subject>` too).
    /// Custom `claims` are chosen by whoever writes this object: never trust them for identity. A
    /// cluster administrator can limit each namespace's audiences (operator `--jwt-policy-file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSource>,

    /// A GitHub App installation access token (valid one hour), made from the App's private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_app: Option<GitHubAppSource>,

    /// A static API key copied from a Secret. It does not expire unless the Secret changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKeySource>,

    /// A browser session: imported cookies, or cookies from logging in through a form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionSource>,
}

/// A key in a Secret in the same namespace as the McpCredential.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The name of the Secret, in the McpCredential's namespace.
    #[schemars(length(max = 253))]
    #[x_kube(validation = object_name("secretKeyRef.name"))]
    pub name: String,
    /// The key inside the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The OAuth 2.0 grant the operator uses.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OAuth2Grant {
    /// The client credentials grant (RFC 6749 §4.4): the client acts on its own behalf.
    ClientCredentials,
    /// The refresh token grant (RFC 6749 §6): redeems `refreshToken` for access tokens.
    RefreshToken,
    /// A person signs in once in a browser (authorization code with PKCE, RFC 6749 §4.1 and RFC
    /// 7636); the operator (or standalone mode) then keeps the grant alive with its refresh token.
    /// Only `spec.upstream` is needed: endpoints are discovered and the client registers itself.
    /// Sign in with `kubectl mcpcred login <name>` (or `mcp-credentials-sidecar login` standalone).
    AuthorizationCode,
}

/// How the client authenticates to the token endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ClientAuth {
    /// HTTP Basic with the client ID and secret (`client_secret_basic`).
    ClientSecretBasic,
    /// The client ID and secret in the form body (`client_secret_post`).
    ClientSecretPost,
    /// A JWT signed with `privateKey` (`private_key_jwt`, RFC 7523).
    PrivateKeyJwt,
    /// A public client: only `client_id` is sent.
    None,
}

/// An OAuth 2.0 token endpoint grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.grant != 'refreshToken' || has(self.refreshToken)").message(
    "oauth2.refreshToken is required when grant is refreshToken: name the Secret key holding the refresh token"
))]
#[x_kube(validation = Rule::new("self.grant == 'authorizationCode' || has(self.clientId)").message(
    "oauth2.clientId is required unless grant is authorizationCode (which registers a client itself)"
))]
#[x_kube(validation = Rule::new("self.grant == 'authorizationCode' || !has(self.signIn)").message(
    "oauth2.signIn applies only to grant authorizationCode"
))]
#[x_kube(validation = Rule::new("!has(self.clientAuth) || self.clientAuth != 'privateKeyJwt' || has(self.privateKey)").message(
    "oauth2.privateKey is required when clientAuth is privateKeyJwt: name the Secret key holding the PEM private key"
))]
#[x_kube(validation = Rule::new(
    "!has(self.clientAuth) || !(self.clientAuth in ['clientSecretBasic', 'clientSecretPost']) || has(self.clientSecret)"
).message(
    "oauth2.clientSecret is required when clientAuth is clientSecretBasic or clientSecretPost"
))]
pub struct OAuth2Source {
    /// The grant: `clientCredentials`, `refreshToken` or `authorizationCode` (a person signs in once).
    pub grant: OAuth2Grant,

    /// The token endpoint. When omitted, it is discovered from the upstream's protected resource
    /// metadata (RFC 9728) and its authorization server's metadata (RFC 8414 / OpenID Connect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("oauth2.tokenUrl"))]
    pub token_url: Option<String>,

    /// The OAuth client ID. Required for `clientCredentials` and `refreshToken`. For
    /// `authorizationCode`, a client registered beforehand with the authorization server; default:
    /// the client registers itself at sign-in (a Client ID Metadata Document when the server
    /// supports one and `signIn.clientMetadataUrl` is set, else RFC 7591 Dynamic Client Registration).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(min = 1, max = 1024))]
    pub client_id: String,

    /// The client secret, for `clientSecretBasic` and `clientSecretPost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,

    /// How the client authenticates. Default: `clientSecretBasic` when `clientSecret` is set,
    /// `privateKeyJwt` when `privateKey` is set, otherwise `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,

    /// The PEM private key (RSA or EC P-256) that signs the client assertion for `privateKeyJwt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<SecretKeyRef>,

    /// The refresh token, for the `refreshToken` grant. When the server rotates it, the operator
    /// writes the new one back to this key before publishing the new access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<SecretKeyRef>,

    /// Scopes to request. Default: none (the server's default scopes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,

    /// The RFC 8707 `resource` sent on every token request, refresh included. Default: `spec.upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    pub resource: Option<String>,

    /// An `audience` parameter for servers that want one (Auth0, Okta). Default: not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,

    /// Extra form parameters sent with every token request. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_params: BTreeMap<String, String>,

    /// Workarounds for identity providers that deviate from the specs. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quirks: Option<ProviderQuirks>,

    /// For `authorizationCode`: where the sign-in's result is kept and how the client identifies
    /// itself. Default: the Secret `<metadata.name>-sign-in`, no client metadata document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sign_in: Option<SignIn>,
}

/// Where a sign-in's result is kept, and how the client identifies itself when it registers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SignIn {
    /// The Secret in this namespace that `kubectl mcpcred login` writes and the operator reads and
    /// updates (its key `refresh-token`: the refresh token, rotated in place; `registration`: the
    /// client registrations, JSON keyed by the authorization server's issuer). In standalone mode,
    /// the directory `<secrets-dir>/<secretName>/`. Default: `<metadata.name>-sign-in`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = object_name("oauth2.signIn.secretName"))]
    pub secret_name: Option<String>,

    /// The HTTPS URL of this client's Client ID Metadata Document, used as the `client_id` when the
    /// authorization server advertises `client_id_metadata_document_supported`. The document must
    /// be served there, with `client_id` equal to this URL and the loopback `redirect_uris`
    /// `http://127.0.0.1/callback`. Default: none (Dynamic Client Registration instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("oauth2.signIn.clientMetadataUrl"))]
    pub client_metadata_url: Option<String>,
}

/// Workarounds for identity providers that deviate from the MCP authorization rules.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderQuirks {
    /// Do not send the RFC 8707 `resource` parameter, for servers that reject it. Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub omit_resource: bool,

    /// Audiences accepted in the issued token's `aud` besides the requested resource, for servers
    /// that issue a fixed audience. Default: none (a JWT whose `aud` differs is rejected).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accept_audiences: Vec<String>,
}

/// The grant used to trade a subject token for an upstream token.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum ExchangeGrant {
    /// RFC 8693 token exchange (`urn:ietf:params:oauth:grant-type:token-exchange`).
    #[default]
    TokenExchange,
    /// RFC 7523 JWT bearer (`urn:ietf:params:oauth:grant-type:jwt-bearer`).
    JwtBearer,
}

/// RFC 8693 token exchange or RFC 7523 JWT-bearer grant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(self.crossAppAccess) || (has(self.grant) && self.grant == 'jwtBearer')"
).message(
    "tokenExchange.crossAppAccess needs grant: jwtBearer (the ID-JAG from the identity provider is redeemed with \
     the JWT-bearer grant)"
))]
#[x_kube(validation = Rule::new(
    "!has(self.crossAppAccess) || !has(self.tokenUrl) || has(self.crossAppAccess.audience)"
).message(
    "tokenExchange.crossAppAccess.audience is required when tokenExchange.tokenUrl is set: the issuer of the MCP \
     server's authorization server (without tokenUrl it is discovered)"
))]
pub struct TokenExchangeSource {
    /// The grant. Default: `tokenExchange`.
    #[serde(default)]
    pub grant: ExchangeGrant,

    /// The token endpoint. When omitted, it is discovered as for `oauth2.tokenUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("tokenExchange.tokenUrl"))]
    pub token_url: Option<String>,

    /// The OAuth client ID, when the server wants the client identified. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,

    /// The client secret, sent with HTTP Basic. Default: none (the subject token alone authenticates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,

    /// The token to exchange.
    pub subject: SubjectToken,

    /// The `audience` parameter. Default: not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,

    /// Scopes to request. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,

    /// The RFC 8707 `resource`. Default: `spec.upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    pub resource: Option<String>,

    /// The `requested_token_type`. Default: `urn:ietf:params:oauth:token-type:access_token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_token_type: Option<String>,

    /// Workarounds for identity providers that deviate from the specs. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quirks: Option<ProviderQuirks>,

    /// Cross-app access (MCP Enterprise-Managed Authorization; the IETF draft Identity Assertion
    /// JWT Authorization Grant, ID-JAG), with `grant: jwtBearer`: on every renewal the subject
    /// token (the person's ID token from the enterprise identity provider) is first exchanged at
    /// the identity provider (RFC 8693, `requested_token_type`
    /// `urn:ietf:params:oauth:token-type:id-jag`, with `audience` the MCP server's authorization
    /// server and `resource`), and the ID-JAG it issues is the assertion of the JWT-bearer grant at
    /// the MCP server's authorization server (which `clientId` and `clientSecret` authenticate to).
    /// `scopes` are sent with both requests, `resource` with both (`quirks.omitResource` drops it
    /// from the second only). Default: none (the subject token itself is the assertion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_app_access: Option<CrossAppAccess>,
}

/// The identity provider's side of cross-app access: where the subject token is exchanged for an
/// ID-JAG, and the client that asks.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.clientSecret) || has(self.clientId)").message(
    "tokenExchange.crossAppAccess.clientId is required with tokenExchange.crossAppAccess.clientSecret"
))]
pub struct CrossAppAccess {
    /// The identity provider's token endpoint (the `token_endpoint` of its OpenID Connect metadata),
    /// for example `https://idp.example.com/oauth2/token`.
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("tokenExchange.crossAppAccess.tokenUrl"))]
    pub token_url: String,

    /// This client's ID at the identity provider (the audience of the person's ID token; usually
    /// not the client ID at the MCP server's authorization server). Default: none sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub client_id: Option<String>,

    /// This client's secret at the identity provider, sent with HTTP Basic. Default: none (a public
    /// client, identified by `clientId` in the form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<SecretKeyRef>,

    /// The ID-JAG's `audience`: the issuer of the MCP server's authorization server. Default: the
    /// issuer discovery finds (required when `tokenExchange.tokenUrl` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_URL_LENGTH))]
    pub audience: Option<String>,
}

/// The subject token: exactly one of `serviceAccount` or `secretKeyRef`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.serviceAccount) != has(self.secretKeyRef)").message(
    "tokenExchange.subject must set exactly one of serviceAccount or secretKeyRef"
))]
pub struct SubjectToken {
    /// A short-lived token for a service account in this namespace, requested by the operator from
    /// the TokenRequest API on every refresh. With an authorization server that trusts the cluster's
    /// service-account issuer, no secret is stored anywhere. The ServiceAccount must allow the
    /// audience with the annotation `mcpcredentials.dev/token-exchange-audiences: <audience>[,...]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountSubject>,

    /// A token stored in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,

    /// The `subject_token_type`. Default: `urn:ietf:params:oauth:token-type:jwt`
    /// (`urn:ietf:params:oauth:token-type:id_token` for a stored token with `crossAppAccess`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
}

/// A service account whose token is the subject token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSubject {
    /// The service account's name, in this namespace.
    #[schemars(length(max = 253))]
    #[x_kube(validation = object_name("subject.serviceAccount.name"))]
    pub name: String,

    /// The audience of the service-account token: what the authorization server expects.
    #[schemars(length(min = 1, max = 1024))]
    pub audience: String,

    /// Lifetime of the service-account token, in seconds. Default: 600 (the API server's minimum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 600, max = 86400))]
    pub expiration_seconds: Option<i64>,
}

/// The signature algorithm of a minted JWT.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    /// ECDSA with P-256 and SHA-256.
    #[default]
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (2048-bit keys).
    RS256,
}

/// A JWT minted and signed by the operator, bound to the McpCredential's namespace: `sub` is
/// `mcpcred:<namespace>:<subject>`, and the claims `mcpcredentials.dev/namespace` and
/// `mcpcredentials.dev/credential` hold the namespace and the McpCredential's name.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JwtSource {
    /// Who the agent acts as, for example `research`. The token's `sub` is
    /// `mcpcred:<namespace>:<subject>` (so `research` in namespace `agents` gives
    /// `mcpcred:agents:research`): no namespace can mint another namespace's subject. A cluster
    /// administrator can let a namespace mint a subject without the prefix (operator
    /// `--jwt-policy-file`, `unprefixedSubjects`), as a migration path.
    #[schemars(length(min = 1, max = 1024))]
    pub subject: String,

    /// The `aud` claim. Default: `spec.upstream`. When a cluster administrator has set an audience
    /// policy (operator `--jwt-policy-file`, Helm value `jwt.audiencePolicy`), only the audiences it
    /// allows for this namespace are minted; any other is `Ready=False`, reason `AudienceNotAllowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,

    /// How long each token is valid, between 1m and 24h. Default: `15m`.
    #[serde(default = "default_jwt_ttl")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_between("jwt.ttl", "1m", "24h"))]
    pub ttl: String,

    /// The signature algorithm. Default: `ES256`.
    #[serde(default)]
    pub algorithm: JwtAlgorithm,

    /// Extra claims, merged into the token. `iss`, `sub`, `aud`, `iat`, `nbf`, `exp`, `jti` and
    /// every claim starting with `mcpcredentials.dev` (the namespace and credential the token is
    /// bound to) are set by the operator and cannot be set here. Anyone who may write this object
    /// chooses these values, so an upstream must not trust them for identity. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new(
        "!self.exists(k, k in ['iss', 'sub', 'aud', 'iat', 'nbf', 'exp', 'jti'] || k.startsWith('mcpcredentials.dev'))"
    ).message(
        "jwt.claims cannot set the registered claims iss, sub, aud, iat, nbf, exp or jti, nor claims starting with \
         mcpcredentials.dev (the operator sets mcpcredentials.dev/namespace and mcpcredentials.dev/credential to bind \
         the token to this namespace)"
    ))]
    pub claims: BTreeMap<String, String>,
}

fn default_jwt_ttl() -> String {
    "15m".into()
}

/// A GitHub App installation access token.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GitHubAppSource {
    /// The App's ID (or client ID), shown on the App's settings page.
    #[schemars(length(min = 1, max = 64))]
    pub app_id: String,

    /// The installation ID: the number in the installation's settings URL.
    #[schemars(range(min = 1))]
    pub installation_id: i64,

    /// The App's PEM private key.
    pub private_key: SecretKeyRef,

    /// Narrow the token to these repositories (names without owner). Default: every repository
    /// the installation can access.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,

    /// Narrow the token's permissions, for example `{contents: read, issues: write}`. Default:
    /// every permission the installation has.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, String>,

    /// The GitHub API URL, for GitHub Enterprise Server. Default: `https://api.github.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("githubApp.apiUrl"))]
    pub api_url: Option<String>,
}

/// A static API key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySource {
    /// The Secret key holding the API key.
    pub secret_key_ref: SecretKeyRef,
}

/// The format of imported cookies.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CookieFormat {
    /// Netscape `cookies.txt`, as browser extensions and curl export.
    Netscape,
    /// A JSON array of `{name, value, domain, path, expirationDate}` objects.
    Json,
}

/// A browser session: exactly one of `cookies`, `formLogin` or `browser` (`browser` in standalone
/// mode only).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.cookies), has(self.formLogin), has(self.browser)].filter(x, x).size() == 1"
).message("session must set exactly one of cookies, formLogin or browser"))]
// The API server refuses `browser` at admission: a cluster has no browser. Standalone mode reads
// the same type from YAML without the API server, so there it stays valid (nothing in this crate
// evaluates the CRD's rules).
#[x_kube(validation = Rule::new("!has(self.browser)")
    .message(crate::source::session::browser::STANDALONE_ONLY)
    .field_path(".browser"))]
pub struct SessionSource {
    /// Cookies exported from a browser and stored in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookies: Option<ImportedCookies>,

    /// Log in through a form and keep the cookies it sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form_login: Option<FormLogin>,

    /// The session the person has in their own browser, handed to the standalone sidecar by the
    /// mcp-credentials browser extension (standalone mode only: a cluster has no browser).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub browser: Option<BrowserSession>,

    /// A URL that answers `expectStatus` while the session is alive. Default: no check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<SessionCheck>,
}

/// Cookies stored in a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImportedCookies {
    /// The Secret key holding the cookies.
    pub secret_key_ref: SecretKeyRef,
    /// The format. Default: detected (JSON if the value starts with `[`, otherwise Netscape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<CookieFormat>,
}

/// A session from the person's browser: the cookies the browser would send to `url`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BrowserSession {
    /// The site whose cookies make the session: the extension reads the cookies the browser would
    /// send to this URL (domain, path, secure) and the sidecar accepts no other. Default:
    /// `spec.upstream`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("session.browser.url"))]
    pub url: Option<String>,
    /// The page the extension opens for the person to sign in again. Default: the origin of `url`
    /// (`https://wiki.example.com/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("session.browser.signInUrl"))]
    pub sign_in_url: Option<String>,
}

/// A form login.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FormLogin {
    /// The URL the login form posts to.
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("session.formLogin.url"))]
    pub url: String,
    /// The Secret key holding the user name.
    pub username: SecretKeyRef,
    /// The Secret key holding the password.
    pub password: SecretKeyRef,
    /// The form field for the user name. Default: `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_field: Option<String>,
    /// The form field for the password. Default: `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_field: Option<String>,
    /// Other form fields to post. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

/// A liveness check of a session.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionCheck {
    /// The URL to GET with the session's cookies.
    #[schemars(length(max = MAX_URL_LENGTH))]
    #[x_kube(validation = https_url("session.check.url"))]
    pub url: String,
    /// The status it answers while the session is alive. Default: 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 100, max = 599))]
    pub expect_status: Option<i32>,
    /// How often to check, between 1m and 24h. Default: `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_between("session.check.interval", "1m", "24h"))]
    pub interval: Option<String>,
}

/// How the credential is attached to each request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Inject {
    /// The header to set. Default: `Authorization` (`Cookie` for sessions). Must be a valid HTTP
    /// header name, and not one that controls the connection or the message framing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[-!#$%&\\'*+.^_`|~0-9A-Za-z]+$')").message(
        "inject.header must be a valid HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only), \
         for example Authorization or X-API-Key"
    ))]
    #[x_kube(validation = Rule::new(
        "!(self.lowerAscii() in ['host', 'connection', 'content-length', 'transfer-encoding', 'te', \
         'trailer', 'upgrade', 'keep-alive', 'proxy-connection'])"
    ).message(
        "inject.header cannot be a header that controls the connection or message framing (Host, Connection, \
         Content-Length, Transfer-Encoding, TE, Trailer, Upgrade, Keep-Alive); use Authorization or a custom header"
    ))]
    pub header: Option<String>,

    /// The header value, where `{token}` stands for the credential. Default: `Bearer {token}`
    /// (`{token}` for API keys in a header other than Authorization, and for sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.contains('{token}')").message(
        "inject.format must contain {token}, where the credential goes, for example 'Bearer {token}'"
    ))]
    pub format: Option<String>,
}

/// When to renew: at most one of the fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.renewBefore) && has(self.renewBeforePercentage))").message(
    "set at most one of refresh.renewBefore and refresh.renewBeforePercentage"
))]
pub struct Refresh {
    /// Renew this long before the credential expires, for example `10m`. If the credential lives
    /// shorter than that, it is renewed at 2/3 of its lifetime instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = duration_between("refresh.renewBefore", "1s", "720h"))]
    pub renew_before: Option<String>,

    /// Renew when this percentage of the credential's lifetime is left, from 1 to 99. Default: 33.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 99").message(
        "refresh.renewBeforePercentage must be between 1 and 99 (the percentage of the lifetime left at renewal)"
    ))]
    pub renew_before_percentage: Option<i32>,
}

/// Who may use the credential: the service accounts whose pods get read access to its Secret
/// (a Role and RoleBinding kept by the operator), may be injected with it, and may report on it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!(has(self.allServiceAccounts) && self.allServiceAccounts && has(self.serviceAccounts) && size(self.serviceAccounts) > 0)"
).message(
    "set either access.serviceAccounts or access.allServiceAccounts: true, not both"
))]
pub struct Access {
    /// Service accounts in this namespace whose pods may use this credential. Default (empty):
    /// none, so the credential is usable only once its agents' service accounts are listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub service_accounts: Vec<String>,

    /// Let every service account of this namespace use the credential, `default` included: any pod
    /// of the namespace that mounts its service-account token can then read the credential's
    /// Secret. Only for namespaces where every workload is trusted with it. Default: false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_service_accounts: Option<bool>,
}

/// What the operator observed. Written only by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpCredentialStatus {
    /// `Ready`, `Refreshing`, `ReauthRequired` and others, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The kind of source, for example `oauth2/clientCredentials` (the Source column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,

    /// When the current credential became valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,

    /// When the current credential expires. Absent for credentials that do not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,

    /// When the operator will renew the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<Time>,

    /// When the credential was last obtained successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,

    /// Consecutive failed attempts since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_attempts: Option<i32>,

    /// When the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,

    /// Why the last attempt failed. Never contains credential material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,

    /// The Secret holding the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,

    /// Changes every time a new credential is written (the Secret's `version` key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_version: Option<String>,

    /// What discovery found when no token URL is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,

    /// A fingerprint (no secret values) of the inputs the authorization server answered
    /// `invalid_grant` for: the spec, the referenced Secrets' versions and the refresh request. The
    /// operator does not try them again, also after a restart, until one of them changes. Absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_grant_inputs: Option<String>,
}

/// The result of OAuth discovery.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryStatus {
    /// The protected resource metadata document used (RFC 9728).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_metadata: Option<String>,
    /// The authorization server's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The token endpoint in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
}

/// Conditions as a map keyed by `type`, so server-side apply merges them one by one.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<Condition>();
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
        "description": "`Ready`, `Refreshing`, `ReauthRequired` and others, each with a reason and message.",
    })
}
