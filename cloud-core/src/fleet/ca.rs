//! The fleet CA: one directory holding the CA certificate and key, the cloud's server
//! certificate, a ledger of issued device certificates, and the revocation list.
//!
//! ```text
//! CA_DIR/ca.pem  ca.key          the fleet CA (key: owner-only)
//! CA_DIR/server.pem server.key   the cloud core's QUIC certificate, signed by the CA
//! CA_DIR/issued.json             every device certificate issued: device, serial, validity
//! CA_DIR/crl.pem                 revoked serials, signed by the CA (rewritten on revoke)
//! ```
//!
//! A device's identity is the common name of its certificate. Revoking a device revokes
//! every certificate issued to it so far; issuing it a new one afterwards brings it back.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// One issued device certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Issued {
    /// The device id (the certificate's common name).
    pub device: String,
    /// Serial number, hex.
    pub serial: String,
    /// Issued at (RFC 3339).
    pub issued: String,
    /// Valid until (RFC 3339).
    pub not_after: String,
    /// Revoked at (RFC 3339), if revoked.
    pub revoked: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
struct Ledger {
    certificates: Vec<Issued>,
    crl_number: u64,
}

/// A device's certificate and key, as PEM.
pub struct DeviceIdentity {
    /// The device certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// The fleet CA certificate (what the device trusts).
    pub ca_pem: String,
}

/// File names inside the CA directory.
pub mod files {
    /// CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// CA key.
    pub const CA_KEY: &str = "ca.key";
    /// Server certificate.
    pub const SERVER_CERT: &str = "server.pem";
    /// Server key.
    pub const SERVER_KEY: &str = "server.key";
    /// Revocation list.
    pub const CRL: &str = "crl.pem";
    /// Ledger of issued certificates.
    pub const LEDGER: &str = "issued.json";
}

/// Is `id` usable as a device id: 1–64 characters of `A-Za-z0-9._-`.
pub fn valid_device_id(id: &str) -> bool {
    shared::schema::valid_machine(id)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn write_public(path: &Path, data: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn random_serial() -> SerialNumber {
    // 16 random bytes, top bit clear (a positive integer).
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

fn ca_params(name: &str) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// An opened CA directory.
pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    key: KeyPair,
}

impl Ca {
    /// Creates a new CA in `dir` (which must not hold one) named `name`, with a server
    /// certificate for `server_names` (DNS names or IP addresses the edges connect to).
    pub fn init(dir: &Path, name: &str, server_names: &[String]) -> anyhow::Result<Ca> {
        if dir.join(files::CA_KEY).exists() {
            bail!(
                "{} already holds a CA; refusing to overwrite it",
                dir.display()
            );
        }
        if server_names.is_empty() {
            bail!("the server certificate needs at least one name (--server-name)");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = ca_params(name)?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_private(&dir.join(files::CA_KEY), &key.serialize_pem())?;
        write_public(&dir.join(files::CA_CERT), &cert.pem())?;
        let ca = Ca {
            dir: dir.to_path_buf(),
            cert_pem: cert.pem(),
            key,
        };
        ca.issue_server(server_names)?;
        ca.save_ledger(&Ledger::default())?;
        ca.write_crl(&Ledger::default())?;
        Ok(ca)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Ca> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).with_context(|| {
                format!(
                    "reading {} (is this a CA directory?)",
                    dir.join(f).display()
                )
            })
        };
        let key = KeyPair::from_pem(&read(files::CA_KEY)?)
            .with_context(|| format!("{}: not a private key", dir.join(files::CA_KEY).display()))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            cert_pem: read(files::CA_CERT)?,
            key,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issuer(&self) -> anyhow::Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).with_context(|| {
            format!(
                "{}: not a CA certificate",
                self.dir.join(files::CA_CERT).display()
            )
        })
    }

    fn issue_server(&self, names: &[String]) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for n in names {
            let san = match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.clone()
                        .try_into()
                        .with_context(|| format!("server name {n:?} is not a DNS name"))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "cloud-core");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(825);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        write_private(&self.dir.join(files::SERVER_KEY), &key.serialize_pem())?;
        write_public(&self.dir.join(files::SERVER_CERT), &cert.pem())
    }

    fn ledger(&self) -> anyhow::Result<Ledger> {
        let f = self.dir.join(files::LEDGER);
        if !f.exists() {
            return Ok(Ledger::default());
        }
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid ledger", f.display()))
    }

    fn save_ledger(&self, l: &Ledger) -> anyhow::Result<()> {
        write_public(
            &self.dir.join(files::LEDGER),
            &serde_json::to_string_pretty(l)?,
        )
    }

    /// Issues a certificate for device `id`, valid for `days`.
    pub fn issue_device(&self, id: &str, days: u32) -> anyhow::Result<DeviceIdentity> {
        if !valid_device_id(id) {
            bail!("device id {id:?} must be 1–64 characters of A-Za-z0-9._-");
        }
        if days == 0 {
            bail!("--days must be at least 1");
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days));
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let mut ledger = self.ledger()?;
        ledger.certificates.push(Issued {
            device: id.to_string(),
            serial: hex::encode(serial.as_ref()),
            issued: rfc3339(now),
            not_after: rfc3339(params.not_after),
            revoked: None,
        });
        self.save_ledger(&ledger)?;
        Ok(DeviceIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }

    /// Revokes every certificate issued to `id` so far and rewrites the revocation list.
    /// Returns how many were newly revoked.
    pub fn revoke_device(&self, id: &str) -> anyhow::Result<usize> {
        let mut ledger = self.ledger()?;
        if !ledger.certificates.iter().any(|c| c.device == id) {
            bail!("no certificate was issued to device {id:?}");
        }
        let now = rfc3339(OffsetDateTime::now_utc());
        let mut n = 0;
        for c in ledger.certificates.iter_mut().filter(|c| c.device == id) {
            if c.revoked.is_none() {
                c.revoked = Some(now.clone());
                n += 1;
            }
        }
        ledger.crl_number += 1;
        self.write_crl(&ledger)?;
        self.save_ledger(&ledger)?;
        Ok(n)
    }

    /// Every certificate issued, with its state.
    pub fn issued(&self) -> anyhow::Result<Vec<Issued>> {
        Ok(self.ledger()?.certificates)
    }

    fn write_crl(&self, ledger: &Ledger) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc();
        let revoked = ledger
            .certificates
            .iter()
            .filter(|c| c.revoked.is_some())
            .map(|c| {
                let serial = hex::decode(&c.serial)
                    .with_context(|| format!("ledger: bad serial {:?}", c.serial))?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: now,
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(3650),
            crl_number: SerialNumber::from(ledger.crl_number.max(1)),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        write_public(&self.dir.join(files::CRL), &crl.pem()?)
    }
}
