//! Sealed secrets: a secret for one agent is encrypted to that agent's X25519 public key, so the
//! controller's store and JetStream's store only ever hold ciphertext, and only that agent can
//! open it.
//!
//! Format (version 1): `0x01 || ephemeral public key (32) || nonce (12) || tag (16) || ciphertext`.
//! Key: HKDF-SHA256(ikm = X25519(ephemeral, recipient), salt = ephemeral pub || recipient pub,
//! info = "coffer seal v1"). AES-256-GCM with the context string (instance, field) as associated
//! data, so a sealed value cannot be moved to another instance or field.
//!
//! Pure computation, no I/O.

use openssl::derive::Deriver;
use openssl::md::Md;
use openssl::pkey::{Id, PKey};
use openssl::pkey_ctx::PkeyCtx;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};

const VERSION: u8 = 1;
const INFO: &[u8] = b"coffer seal v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the public key is not a 32-byte X25519 key")]
    BadPublicKey,
    #[error("the secret key is not a 32-byte X25519 key")]
    BadSecretKey,
    #[error("the sealed value is malformed")]
    Malformed,
    #[error(
        "the sealed value cannot be opened with this key (sealed to another agent, or altered)"
    )]
    CannotOpen,
    #[error("crypto failure: {0}")]
    Crypto(String),
}

fn crypto(e: openssl::error::ErrorStack) -> SealError {
    SealError::Crypto(e.to_string())
}

/// A new key pair: `(secret, public)`, raw 32 bytes each.
pub fn generate() -> Result<(Vec<u8>, Vec<u8>), SealError> {
    let k = PKey::generate_x25519().map_err(crypto)?;
    Ok((
        k.raw_private_key().map_err(crypto)?,
        k.raw_public_key().map_err(crypto)?,
    ))
}

/// The public key belonging to a secret key.
pub fn public_of(secret: &[u8]) -> Result<Vec<u8>, SealError> {
    let k = PKey::private_key_from_raw_bytes(secret, Id::X25519)
        .map_err(|_| SealError::BadSecretKey)?;
    k.raw_public_key().map_err(crypto)
}

fn derive_key(
    own_secret: &PKey<openssl::pkey::Private>,
    peer_public: &[u8],
    salt: &[u8],
) -> Result<Vec<u8>, SealError> {
    let peer = PKey::public_key_from_raw_bytes(peer_public, Id::X25519)
        .map_err(|_| SealError::BadPublicKey)?;
    let mut d = Deriver::new(own_secret).map_err(crypto)?;
    d.set_peer(&peer).map_err(crypto)?;
    let shared = d.derive_to_vec().map_err(crypto)?;
    let mut ctx = PkeyCtx::new_id(Id::HKDF).map_err(crypto)?;
    ctx.derive_init().map_err(crypto)?;
    ctx.set_hkdf_md(Md::sha256()).map_err(crypto)?;
    ctx.set_hkdf_key(&shared).map_err(crypto)?;
    ctx.set_hkdf_salt(salt).map_err(crypto)?;
    ctx.add_hkdf_info(INFO).map_err(crypto)?;
    let mut key = vec![0u8; 32];
    ctx.derive(Some(&mut key)).map_err(crypto)?;
    Ok(key)
}

/// Seals `plaintext` to `recipient_public` under `context`.
pub fn seal(
    recipient_public: &[u8],
    context: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if recipient_public.len() != 32 {
        return Err(SealError::BadPublicKey);
    }
    let eph = PKey::generate_x25519().map_err(crypto)?;
    let eph_pub = eph.raw_public_key().map_err(crypto)?;
    let mut salt = eph_pub.clone();
    salt.extend_from_slice(recipient_public);
    let key = derive_key(&eph, recipient_public, &salt)?;
    let mut nonce = [0u8; 12];
    openssl::rand::rand_bytes(&mut nonce).map_err(crypto)?;
    let mut tag = [0u8; 16];
    let ct = encrypt_aead(
        Cipher::aes_256_gcm(),
        &key,
        Some(&nonce),
        context.as_bytes(),
        plaintext,
        &mut tag,
    )
    .map_err(crypto)?;
    let mut out = Vec::with_capacity(1 + 32 + 12 + 16 + ct.len());
    out.push(VERSION);
    out.extend_from_slice(&eph_pub);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a value sealed to the key pair whose secret is `secret` under `context`.
pub fn open(secret: &[u8], context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < 1 + 32 + 12 + 16 || sealed[0] != VERSION {
        return Err(SealError::Malformed);
    }
    let own = PKey::private_key_from_raw_bytes(secret, Id::X25519)
        .map_err(|_| SealError::BadSecretKey)?;
    let own_pub = own.raw_public_key().map_err(crypto)?;
    let eph_pub = &sealed[1..33];
    let nonce = &sealed[33..45];
    let tag = &sealed[45..61];
    let ct = &sealed[61..];
    let mut salt = eph_pub.to_vec();
    salt.extend_from_slice(&own_pub);
    let key = derive_key(&own, eph_pub, &salt)?;
    decrypt_aead(
        Cipher::aes_256_gcm(),
        &key,
        Some(nonce),
        context.as_bytes(),
        ct,
        tag,
    )
    .map_err(|_| SealError::CannotOpen)
}

/// The context string of a user's password in an intent.
pub fn user_password_context(instance: &str, user: &str, host: &str) -> String {
    format!("coffer/v1/{instance}/user/{user}@{host}")
}

/// The context string of a backup key sent to an agent (`Backup.key_sealed`,
/// `ChainLink.key_sealed`).
pub fn backup_key_context(instance: &str, key_id: &str) -> String {
    format!("coffer/v1/{instance}/backup-key/{key_id}")
}

/// The context string of a restore's storage grant (`RestoreFrom.grant_sealed`).
pub fn restore_grant_context(instance: &str) -> String {
    format!("coffer/v1/{instance}/restore-grant")
}

/// The context string of a root password sent to an agent.
pub fn root_password_context(instance: &str) -> String {
    format!("coffer/v1/{instance}/root")
}

/// The context string of the replication user's password as sealed to an instance's agent.
pub fn replication_password_context(instance: &str) -> String {
    format!("coffer/v1/{instance}/replication")
}

/// The context string of a replication password the controller keeps for a source (sealed to
/// the controller's own key).
pub fn kept_replication_context(source: &str) -> String {
    format!("coffer/v1/{source}/replication/kept")
}

/// The context string of a module's contents as sealed to an instance's agent.
pub fn module_contents_context(instance: &str, module: &str) -> String {
    format!("coffer/v1/{instance}/module/{module}")
}

/// The context string of a module's contents kept by the controller (sealed to its own key).
pub fn kept_module_context(module: &str) -> String {
    format!("coffer/v1/module/{module}/kept")
}

/// The context string of the NATS creds the controller seals to an agent at enrolment.
pub fn enrolment_creds_context(instance: &str) -> String {
    format!("coffer/v1/{instance}/enrolment/nats-creds")
}

/// The context string of a secret in the reply to call `call_id` of an instance.
pub fn reply_context(instance: &str, call_id: &str) -> String {
    format!("coffer/v1/{instance}/reply/{call_id}")
}

/// Lower-case hex.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_secret_opens_only_for_the_controller_and_that_call() {
        let (controller_sk, controller_pk) = generate().unwrap();
        let (agent_sk, _) = generate().unwrap();
        let ctx = reply_context("inst-1", "call-9");
        let sealed = seal(&controller_pk, &ctx, b"root-pw").unwrap();
        assert_eq!(open(&controller_sk, &ctx, &sealed).unwrap(), b"root-pw");
        assert!(open(&agent_sk, &ctx, &sealed).is_err());
        assert!(open(&controller_sk, &reply_context("inst-1", "call-10"), &sealed).is_err());
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(
            from_hex(&to_hex(&[0, 1, 254, 255])),
            Some(vec![0, 1, 254, 255])
        );
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn round_trip_and_refusals() {
        let (sk, pk) = generate().unwrap();
        assert_eq!(public_of(&sk).unwrap(), pk);
        let s = seal(&pk, "ctx-a", b"hunter2").unwrap();
        assert!(!s.windows(7).any(|w| w == b"hunter2"), "ciphertext only");
        assert_eq!(open(&sk, "ctx-a", &s).unwrap(), b"hunter2");
        // Another agent's key cannot open it.
        let (other_sk, _) = generate().unwrap();
        assert_eq!(open(&other_sk, "ctx-a", &s), Err(SealError::CannotOpen));
        // Moved to another context (instance, user): refused.
        assert_eq!(open(&sk, "ctx-b", &s), Err(SealError::CannotOpen));
        // Altered: refused.
        let mut bad = s.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(open(&sk, "ctx-a", &bad), Err(SealError::CannotOpen));
        assert_eq!(open(&sk, "ctx-a", &s[..10]), Err(SealError::Malformed));
        assert_eq!(seal(&pk[..5], "x", b"y"), Err(SealError::BadPublicKey));
        // Two seals of the same secret differ (fresh ephemeral key and nonce).
        assert_ne!(seal(&pk, "ctx-a", b"hunter2").unwrap(), s);
    }
}
