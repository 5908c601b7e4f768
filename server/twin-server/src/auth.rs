//! Bearer-token authentication and roles.
//!
//! Tokens come from the config file (plain, or as SHA-256 hex so the file holds no secret).
//! Roles: `read` (GET everything), `submit` (jobs, experiments, blobs; implies read), `execute`
//! (the executor protocol and blobs; implies read), `admin` (everything). With no tokens
//! configured, every caller is `local` with every role, and the server binds loopback only.

use std::collections::{BTreeSet, HashMap};
use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, web};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Submit,
    Execute,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Execute => "execute",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Recorded as the actor of everything done with the token.
    pub name: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_sha256: Option<String>,
    pub roles: BTreeSet<Role>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    tokens: HashMap<[u8; 32], (String, BTreeSet<Role>)>,
    /// Host names served besides loopback ones while auth is off (`api::browser`).
    allowed_hosts: Vec<String>,
}

/// The token `deploy/config.example.toml` ships with, to be replaced: a server started with it
/// would accept a secret that anyone who has read the repository knows.
pub const PLACEHOLDER_TOKEN: &str = "replace-me-with-a-long-random-secret";

/// The shortest secret accepted from a config file: 32 characters (of `openssl rand -hex 16`,
/// 128 bits) keep a bearer token out of reach of guessing over the network.
pub const MIN_TOKEN_CHARS: usize = 32;

/// Refuses configured secrets a server must not start with: the shipped placeholder (given
/// plainly or as its SHA-256) and plain tokens shorter than [`MIN_TOKEN_CHARS`]. A hashed token's
/// length cannot be known; whoever hashed it chose it.
pub fn check_token_strength(configs: &[TokenConfig]) -> anyhow::Result<()> {
    let placeholder = hex::encode(Sha256::digest(PLACEHOLDER_TOKEN.as_bytes()));
    for c in configs {
        let is_placeholder = c.token.as_deref().map(str::trim) == Some(PLACEHOLDER_TOKEN)
            || c.token_sha256
                .as_deref()
                .is_some_and(|h| h.eq_ignore_ascii_case(&placeholder));
        if is_placeholder {
            anyhow::bail!(
                "token `{}` is the example config's placeholder: replace it with a secret of your \
                 own (e.g. `openssl rand -hex 32`)",
                c.name
            );
        }
        if let Some(t) = &c.token
            && t.trim().chars().count() < MIN_TOKEN_CHARS
        {
            anyhow::bail!(
                "token `{}` is {} characters long; tokens must have at least {MIN_TOKEN_CHARS} \
                 (e.g. `openssl rand -hex 32`)",
                c.name,
                t.trim().chars().count()
            );
        }
    }
    Ok(())
}

impl Auth {
    /// The token table as configured; [`check_token_strength`] is the start-up policy on top.
    pub fn new(configs: &[TokenConfig]) -> anyhow::Result<Self> {
        let mut tokens = HashMap::new();
        for c in configs {
            let digest: [u8; 32] = match (&c.token, &c.token_sha256) {
                (Some(t), None) => Sha256::digest(t.as_bytes()).into(),
                (None, Some(h)) => {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(h, &mut d).map_err(|_| {
                        anyhow::anyhow!("token `{}`: token_sha256 is not 64 hex digits", c.name)
                    })?;
                    d
                }
                _ => anyhow::bail!(
                    "token `{}`: give exactly one of `token` and `token_sha256`",
                    c.name
                ),
            };
            if tokens
                .insert(digest, (c.name.clone(), c.roles.clone()))
                .is_some()
            {
                anyhow::bail!("token `{}`: the same token is configured twice", c.name);
            }
        }
        Ok(Self {
            tokens,
            allowed_hosts: Vec::new(),
        })
    }

    /// Serves these host names (without ports) too while auth is off; loopback names always.
    pub fn allow_hosts(&mut self, hosts: Vec<String>) {
        self.allowed_hosts = hosts;
    }

    pub fn allowed_hosts(&self) -> &[String] {
        &self.allowed_hosts
    }

    /// Auth is off when no token is configured.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Adds a token (the embedded executor's, minted at start-up).
    pub fn add(&mut self, name: &str, token: &str, roles: BTreeSet<Role>) {
        self.tokens.insert(
            Sha256::digest(token.as_bytes()).into(),
            (name.to_owned(), roles),
        );
    }

    fn authenticate(&self, req: &HttpRequest) -> Result<Caller, ApiError> {
        if self.is_open() {
            return Ok(Caller {
                name: "local".into(),
                roles: [Role::Admin].into(),
            });
        }
        let header = req
            .headers()
            .get("authorization")
            .ok_or(ApiError::Unauthenticated)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated)?;
        // Looked up by digest: the comparison never touches the secret itself.
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        let (name, roles) = self.tokens.get(&digest).ok_or(ApiError::BadToken)?;
        Ok(Caller {
            name: name.clone(),
            roles: roles.clone(),
        })
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    roles: BTreeSet<Role>,
}

impl Caller {
    /// Whether the caller holds `role` (or one that implies it).
    pub fn has(&self, role: Role) -> bool {
        self.require(role).is_ok()
    }

    /// The caller, as `actor` (what [`Self::require`] returned), for ownership checks on shared
    /// names: admins may act on names others own.
    pub fn claimant<'a>(&self, actor: &'a str) -> crate::service::Claimant<'a> {
        crate::service::Claimant {
            name: actor,
            admin: self.roles.contains(&Role::Admin),
        }
    }

    pub fn require(&self, role: Role) -> Result<&str, ApiError> {
        let has = |r| self.roles.contains(&r);
        let ok = has(Role::Admin)
            || has(role)
            || (role == Role::Read && (has(Role::Submit) || has(Role::Execute)));
        if ok {
            Ok(&self.name)
        } else {
            Err(ApiError::Forbidden {
                name: self.name.clone(),
                role: role.as_str(),
            })
        }
    }

    /// Blob uploads serve both users and executors.
    pub fn require_any(&self, roles: &[Role]) -> Result<&str, ApiError> {
        roles
            .iter()
            .find_map(|r| self.require(*r).ok())
            .ok_or_else(|| ApiError::Forbidden {
                name: self.name.clone(),
                role: roles[0].as_str(),
            })
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(match req.app_data::<web::Data<Auth>>() {
            Some(auth) => auth.authenticate(req),
            None => Err(ApiError::internal("auth", "no Auth in app data")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(name: &str, token: &str) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            token: Some(token.into()),
            token_sha256: None,
            roles: [Role::Read].into(),
        }
    }

    #[test]
    fn short_and_placeholder_tokens_are_refused_at_start() {
        let short = check_token_strength(&[plain("alice", "0123456789abcdef0123456789abcde")])
            .unwrap_err()
            .to_string();
        assert!(short.contains("`alice` is 31 characters"), "{short}");
        let shipped = check_token_strength(&[plain("gpu", PLACEHOLDER_TOKEN)])
            .unwrap_err()
            .to_string();
        assert!(shipped.contains("placeholder"), "{shipped}");
        let hashed = TokenConfig {
            token: None,
            token_sha256: Some(hex::encode(Sha256::digest(PLACEHOLDER_TOKEN)).to_uppercase()),
            ..plain("gpu", "")
        };
        assert!(check_token_strength(&[hashed]).is_err());
        check_token_strength(&[plain("alice", "0123456789abcdef0123456789abcdef")])
            .expect("32 characters are enough");
    }
}
