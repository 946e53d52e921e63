//! Link tokens: how a node knows a request comes from a proxy of its own
//! cluster. A proxy signs a short-lived HS256 token with `cluster_secret`,
//! audience `confab-link`, naming itself, and sends it on every request of
//! its link (`x-confab-link`). Such a request may act for a user by id
//! (`x-confab-user`): the proxy has checked that user's token already.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const AUDIENCE: &str = "confab-link";
/// Header carrying the link token.
pub const HEADER: &str = "x-confab-link";
/// Header naming the user a link request acts for.
pub const USER_HEADER: &str = "x-confab-user";
/// Header naming the client's address on a forwarded login.
pub const CLIENT_IP_HEADER: &str = "x-confab-client-ip";
/// How long a link token is valid; proxies renew it well before.
pub const TTL_SECS: i64 = 300;

#[derive(Serialize, Deserialize)]
struct LinkClaims {
    sub: String,
    aud: String,
    iat: i64,
    exp: i64,
}

pub fn issue(secret: &str, proxy: &str) -> String {
    let now = crate::auth::now_secs();
    let claims = LinkClaims {
        sub: proxy.to_string(),
        aud: AUDIENCE.to_string(),
        iat: now,
        exp: now + TTL_SECS,
    };
    // HS256 over a plain struct cannot fail.
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// The proxy's name if `token` is a valid link token of this cluster.
pub fn verify(secret: &str, token: &str) -> Option<String> {
    let mut v = Validation::new(Algorithm::HS256);
    v.set_audience(&[AUDIENCE]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.leeway = 5;
    jsonwebtoken::decode::<LinkClaims>(token, &DecodingKey::from_secret(secret.as_bytes()), &v)
        .ok()
        .map(|d| d.claims.sub)
}

/// The proxy's name, from a valid link token of `cluster`'s on `req`; 404
/// when this server is not a cluster node, 401 for anything else.
pub fn link_proxy(
    cluster: Option<&crate::placement::Cluster>,
    req: &hyper::Request<hyper::body::Incoming>,
) -> Result<String, crate::error::ApiError> {
    use crate::error::ApiError;
    let cluster = cluster
        .ok_or_else(|| ApiError::not_found("not_found", "this server is not a cluster node"))?;
    req.headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| verify(&cluster.secret, t))
        .ok_or_else(|| ApiError::unauthorized("not a link request of this cluster"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn link_tokens_need_the_secret_and_the_audience() {
        let secret = "0123456789abcdef0123456789abcdef";
        let t = super::issue(secret, "p1");
        assert_eq!(super::verify(secret, &t).as_deref(), Some("p1"));
        assert_eq!(super::verify("another secret of enough length!!", &t), None);
        // A token signed with the same secret but without the audience (a
        // user's token) is not a link token.
        let user_token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &serde_json::json!({"sub": "p1", "exp": crate::auth::now_secs() + 60}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token");
        assert_eq!(super::verify(secret, &user_token), None);
    }
}
