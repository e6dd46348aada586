// A real, independent OAuth 2.0 authorization server (panva/oidc-provider) for the operator's
// end-to-end tests. Usage: node server.mjs <port> [access-token-ttl-seconds]
//
// Clients (all on http://127.0.0.1:<port>, token endpoint /token; discovery at
// /.well-known/openid-configuration, issuer http://127.0.0.1:<port>):
//   cc-basic / cc-basic-secret   client_credentials, client_secret_basic
//   cc-post  / cc-post-secret    client_credentials, client_secret_post
//   cc-jwt                       client_credentials, private_key_jwt (key printed at start)
//   rt-client / rt-client-secret refresh_token (rotating), client_secret_basic
//   wi-client                    RFC 8693 token exchange and RFC 7523 jwt-bearer, no client secret
//                                (token_endpoint_auth_method none): workload identity
// Access tokens are JWTs whose `aud` is the RFC 8707 resource requested.
//
// Workload identity: with MCP_TEST_TRUSTED_ISSUER and MCP_TEST_TRUSTED_JWKS (a JWKS as JSON) set,
// wi-client may present a JWT from that issuer (a Kubernetes service-account token: the cluster's
// --service-account-issuer and its /openid/v1/jwks) as `subject_token` or `assertion`. Its
// signature, issuer, expiry and audience (this server's issuer) are verified; the access token
// issued has the subject token's `sub`. Anything else is invalid_grant.
//
// Sign-in (OAUTH_SIGN_IN=1): oidc-provider's own login and consent pages (any login name and
// password), RFC 7591 dynamic registration open to anyone, PKCE required, RFC 9207 `iss` in every
// authorization response, and a rotating refresh token for every client allowed the grant.
//
// Test-only helpers: GET /test/refresh-token?resource=<url> mints a refresh token for rt-client
// (standing in for a user's browser login); GET /test/stats counts token requests.
// Prints one JSON line {"ready":true,...} on stdout when it listens.
// Environment (both optional, for tests that restart the server):
//   OAUTH_SIGNING_KEY_FILE   keep the token-signing key in this PEM file (created if missing), so
//                            tokens issued before a restart still verify after it, as with a real IdP
//   OAUTH_ISSUED_FILE        append every issued access and refresh token here, one per line, so a
//                            test can check that none of them reaches a log
//   OAUTH_HOST               listen on this address instead of 127.0.0.1 (the issuer names it)
//   OAUTH_TLS_CERT, OAUTH_TLS_KEY   serve HTTPS with this certificate and key (PEM files); the
//                            issuer is then https://<host>:<port> (for clients in pods, which
//                            accept plain http only to loopback)
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { appendFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createPrivateKey, generateKeyPairSync, randomUUID } from 'node:crypto';
import { createLocalJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

const ttl = Number(process.argv[3] || 60);
const signIn = process.env.OAUTH_SIGN_IN === '1';
const trustedIssuer = process.env.MCP_TEST_TRUSTED_ISSUER;
const trustedKeys = process.env.MCP_TEST_TRUSTED_JWKS
  ? createLocalJWKSet(JSON.parse(process.env.MCP_TEST_TRUSTED_JWKS))
  : undefined;

// Listen first, so the issuer carries the real port when the port argument is 0.
let callback = (req, res) => res.writeHead(503).end();
const host = process.env.OAUTH_HOST || '127.0.0.1';
const tls = process.env.OAUTH_TLS_CERT
  ? { cert: readFileSync(process.env.OAUTH_TLS_CERT), key: readFileSync(process.env.OAUTH_TLS_KEY) }
  : undefined;
const server = tls
  ? createTlsServer(tls, (req, res) => callback(req, res))
  : createServer((req, res) => callback(req, res));
await new Promise((resolve) => server.listen(Number(process.argv[2] || 0), host, resolve));
const { port } = server.address();
const issuer = `${tls ? 'https' : 'http'}://${host}:${port}`;

const keyFile = process.env.OAUTH_SIGNING_KEY_FILE;
const issuedFile = process.env.OAUTH_ISSUED_FILE;
function signingKey() {
  if (keyFile && existsSync(keyFile)) return createPrivateKey(readFileSync(keyFile));
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  if (keyFile) writeFileSync(keyFile, privateKey.export({ format: 'pem', type: 'pkcs8' }), { mode: 0o600 });
  return privateKey;
}
const signing = { privateKey: signingKey() };
const recordIssued = (...tokens) => {
  if (!issuedFile) return;
  const lines = tokens.filter((t) => typeof t === 'string').map((t) => `${t}\n`).join('');
  if (lines) appendFileSync(issuedFile, lines);
};
const client = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const clientJwk = { ...client.publicKey.export({ format: 'jwk' }), kid: 'cc-jwt', use: 'sig', alg: 'ES256' };
const resourceServerInfo = (resource) => ({
  scope: 'read write',
  audience: resource,
  accessTokenTTL: ttl,
  accessTokenFormat: 'jwt',
  jwt: { sign: { alg: 'RS256' } },
});

const provider = new Provider(issuer, {
  clients: [
    { client_id: 'cc-basic', client_secret: 'cc-basic-secret', grant_types: ['client_credentials'], response_types: [], redirect_uris: [], token_endpoint_auth_method: 'client_secret_basic' },
    { client_id: 'cc-post', client_secret: 'cc-post-secret', grant_types: ['client_credentials'], response_types: [], redirect_uris: [], token_endpoint_auth_method: 'client_secret_post' },
    { client_id: 'cc-jwt', grant_types: ['client_credentials'], response_types: [], redirect_uris: [], token_endpoint_auth_method: 'private_key_jwt', jwks: { keys: [clientJwk] } },
    { client_id: 'rt-client', client_secret: 'rt-client-secret', grant_types: ['authorization_code', 'refresh_token'], response_types: ['code'], redirect_uris: ['http://127.0.0.1/callback'], token_endpoint_auth_method: 'client_secret_basic' },
    { client_id: 'wi-client', grant_types: [TOKEN_EXCHANGE, JWT_BEARER], response_types: [], redirect_uris: [], token_endpoint_auth_method: 'none' },
  ],
  jwks: { keys: [{ ...signing.privateKey.export({ format: 'jwk' }), kid: 'signing', use: 'sig', alg: 'RS256' }] },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  scopes: ['openid', 'offline_access', 'read', 'write'],
  rotateRefreshToken: true,
  // A refresh token for every sign-in (what MCP clients need), not only for offline_access.
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  features: {
    devInteractions: { enabled: signIn },
    registration: { enabled: signIn },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: (ctx, client, oneOf) => oneOf ?? undefined,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => resourceServerInfo(resource),
    },
  },
  // An exchanged token speaks for the workload: its `sub` is the subject token's.
  formats: {
    customizers: {
      jwt: (ctx, token, jwt) => {
        if (ctx?.exchangedSubject) jwt.payload.sub = ctx.exchangedSubject;
      },
    },
  },
  ttl: { RefreshToken: 24 * 3600, Grant: 24 * 3600 },
});
provider.proxy = false;

let tokenRequests = 0;
provider.use(async (ctx, next) => {
  if (ctx.path === '/token') tokenRequests += 1;
  await next();
  if (ctx.path === '/token' && ctx.body && typeof ctx.body === 'object') {
    recordIssued(ctx.body.access_token, ctx.body.refresh_token);
  }
});

async function mintRefreshToken(resource) {
  const accountId = `user-${randomUUID()}`;
  const grant = new provider.Grant({ accountId, clientId: 'rt-client' });
  grant.addOIDCScope('openid offline_access');
  grant.addResourceScope(resource, 'read write');
  const grantId = await grant.save();
  const rtClient = await provider.Client.find('rt-client');
  const rt = new provider.RefreshToken({
    accountId, client: rtClient, grantId, gty: 'authorization_code',
    scope: 'openid offline_access read write', resource, rotations: 0, iiat: Math.floor(Date.now() / 1000),
  });
  const token = await rt.save();
  recordIssued(token);
  return token;
}

// Workload identity: verify the presented JWT against the trusted issuer's keys, then issue an
// access token for the one requested resource, as the client credentials grant does.
async function exchange(ctx, presented) {
  const { InvalidGrant, InvalidRequest, InvalidTarget } = errors;
  if (!presented) throw new InvalidRequest('no subject token');
  if (!trustedKeys) throw new InvalidGrant('no trusted issuer is configured');
  let claims;
  try {
    ({ payload: claims } = await jwtVerify(presented, trustedKeys, { issuer: trustedIssuer, audience: issuer }));
  } catch (e) {
    throw new InvalidGrant(`subject token rejected: ${e.code || e.message}`);
  }
  const { resource } = ctx.oidc.params;
  if (!resource || Array.isArray(resource)) throw new InvalidTarget('exactly one resource is required');
  const token = new provider.ClientCredentials({ client: ctx.oidc.client, scope: ctx.oidc.params.scope || undefined });
  token.resourceServer = new provider.ResourceServer(resource, resourceServerInfo(resource));
  ctx.exchangedSubject = claims.sub;
  const value = await token.save();
  ctx.body = {
    access_token: value,
    issued_token_type: ACCESS_TOKEN_TYPE,
    token_type: 'Bearer',
    expires_in: token.expiration,
    scope: token.scope,
  };
}

provider.registerGrantType(TOKEN_EXCHANGE, async (ctx) => {
  const { subject_token: subject, subject_token_type: type, requested_token_type: requested } = ctx.oidc.params;
  if (type !== 'urn:ietf:params:oauth:token-type:jwt') throw new errors.InvalidRequest('subject_token_type must be jwt');
  if (requested && requested !== ACCESS_TOKEN_TYPE) throw new errors.InvalidRequest('only access tokens are issued');
  await exchange(ctx, subject);
}, ['subject_token', 'subject_token_type', 'requested_token_type', 'resource', 'audience', 'scope'], ['resource', 'audience']);
provider.registerGrantType(JWT_BEARER, async (ctx) => exchange(ctx, ctx.oidc.params.assertion), ['assertion', 'resource', 'scope'], ['resource']);

const providerCallback = provider.callback();
callback = async (req, res) => {
  const url = new URL(req.url, issuer);
  try {
    if (url.pathname === '/test/refresh-token') {
      const token = await mintRefreshToken(url.searchParams.get('resource'));
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ refresh_token: token }));
    } else if (url.pathname === '/test/refresh-token-status') {
      // Whether a refresh token is the live one of its chain: found, and not consumed by a rotation.
      const token = await provider.RefreshToken.find(url.searchParams.get('token') ?? '');
      res.writeHead(200, { 'content-type': 'application/json' })
        .end(JSON.stringify({ found: Boolean(token), consumed: Boolean(token?.consumed) }));
    } else if (url.pathname === '/test/stats') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token_requests: tokenRequests }));
    } else {
      providerCallback(req, res);
    }
  } catch (e) {
    res.writeHead(500).end(String(e));
  }
};
process.stdout.write(`${JSON.stringify({
  ready: true, port, issuer,
  ccJwtPrivateKeyPem: client.privateKey.export({ format: 'pem', type: 'pkcs8' }),
})}\n`);
// A graceful stop that ends: close idle keep-alive connections too (clients that reuse a pooled
// connection every few seconds would otherwise keep the server alive), and give open requests 1 s.
process.on('SIGTERM', () => {
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 1000).unref();
});
