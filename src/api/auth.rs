//! Bearer tokens and roles.
//!
//! Tokens live in the config only as SHA-256 hashes. A presented token is
//! hashed and compared with every configured hash in constant time, so
//! neither the comparison nor which entry matched shows in the timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::config::{Config, Role};

/// Who is calling, as established by their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name: the actor in the audit log.
    pub name: String,
    /// None when the server runs without tokens (loopback only): every
    /// role is allowed.
    pub role: Option<Role>,
    /// A responder's practice.
    pub practice: String,
}

impl Principal {
    /// Whether this caller may act as one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), Status> {
        match self.role {
            None => Ok(()),
            Some(r) if roles.contains(&r) => Ok(()),
            Some(r) => Err(Status::permission_denied(format!(
                "the {} role may not call this method",
                r.as_str()
            ))),
        }
    }

    /// Whether this caller may act for `practice`: a messaging or
    /// scheduling token bound to a practice acts for that one only.
    pub fn may_act_for(&self, practice: &crate::ids::PracticeId) -> Result<(), Status> {
        let bound = matches!(self.role, Some(Role::Messaging | Role::Scheduling))
            && !self.practice.is_empty();
        if bound && self.practice != practice.as_str() {
            return Err(Status::permission_denied(
                "this token may not act for that practice_id",
            ));
        }
        Ok(())
    }

    pub fn is_admin(&self) -> bool {
        matches!(self.role, None | Some(Role::Admin))
    }
}

#[derive(Debug, Clone)]
pub struct Auth {
    tokens: Vec<([u8; 32], Principal)>,
}

/// Hex SHA-256 of a token, as the config stores it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Auth {
    pub fn new(config: &Config) -> Auth {
        let tokens = config
            .tokens
            .iter()
            .filter_map(|t| {
                let mut h = [0u8; 32];
                // Validated at start-up: 64 hex digits.
                hex::decode_to_slice(&t.sha256, &mut h).ok()?;
                Some((
                    h,
                    Principal {
                        name: t.name.clone(),
                        role: Some(t.role),
                        practice: t.practice.clone(),
                    },
                ))
            })
            .collect();
        Auth { tokens }
    }

    /// Open: no tokens configured, every call allowed (loopback only).
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn authenticate(&self, md: &MetadataMap) -> Result<Principal, Status> {
        if self.is_open() {
            return Ok(Principal {
                name: "anonymous".to_string(),
                role: None,
                practice: String::new(),
            });
        }
        let value = md
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("authorization must be: Bearer <token>"))?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&Principal> = None;
        for (hash, p) in &self.tokens {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(p);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    /// A tonic interceptor that puts the [`Principal`] in the request.
    pub fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let p = self.authenticate(req.metadata())?;
        req.extensions_mut().insert(p);
        Ok(req)
    }
}

/// The caller, as the interceptor established.
pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("request was not authenticated"))
}

/// A new random token: 32 bytes, hex.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b)?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Token;

    fn auth() -> Auth {
        let c = Config {
            tokens: vec![
                Token {
                    name: "voice-runtime".into(),
                    role: Role::Voice,
                    sha256: token_hash("voice-secret"),
                    practice: String::new(),
                },
                Token {
                    name: "oncall".into(),
                    role: Role::Responder,
                    sha256: token_hash("responder-secret"),
                    practice: "p1".into(),
                },
            ],
            ..Default::default()
        };
        Auth::new(&c)
    }

    fn md(auth: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(a) = auth {
            m.insert("authorization", a.parse().expect("ascii"));
        }
        m
    }

    #[test]
    fn authentication_table() {
        let a = auth();
        let cases: &[(Option<&str>, Result<&str, tonic::Code>)] = &[
            (Some("Bearer voice-secret"), Ok("voice-runtime")),
            (Some("Bearer responder-secret"), Ok("oncall")),
            (None, Err(tonic::Code::Unauthenticated)),
            (Some("voice-secret"), Err(tonic::Code::Unauthenticated)),
            (Some("Bearer "), Err(tonic::Code::Unauthenticated)),
            (Some("Bearer wrong"), Err(tonic::Code::Unauthenticated)),
        ];
        for (header, want) in cases {
            let got = a.authenticate(&md(*header));
            match (got, want) {
                (Ok(p), Ok(name)) => assert_eq!(p.name, *name),
                (Err(s), Err(code)) => {
                    assert_eq!(s.code(), *code, "{header:?}");
                    assert!(!s.message().contains("secret") && !s.message().contains("wrong"));
                }
                (got, want) => panic!("{header:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn roles() {
        let a = auth();
        let voice = a
            .authenticate(&md(Some("Bearer voice-secret")))
            .expect("ok");
        assert!(voice.require(&[Role::Voice]).is_ok());
        assert_eq!(
            voice
                .require(&[Role::Responder, Role::Admin])
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        let open = Auth::new(&Config::default());
        assert!(open.is_open());
        let anyone = open.authenticate(&md(None)).expect("open");
        assert!(anyone.require(&[Role::Admin]).is_ok());
    }
}
