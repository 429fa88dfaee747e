//! moto's server, a real SNS implementation, installed into a virtualenv
//! under `target/` (PyPI the first time) and run on a loopback port; the
//! tests read back what it accepted (`GET /moto-api/data.json`, `sns.SMS`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{http, http_with};

const MOTO: &str = "moto[server]==5.2.5";

/// Practice p1's on-call clinician and backup in [`ROSTER_P1`].
pub const ON_CALL: &str = "+15555550101";
pub const BACKUP: &str = "+15555550102";

/// On call around the clock in practice p1; a backup.
pub const ROSTER_P1: &str = r#"
[[practice]]
id = "p1"
time_zone = "UTC"
backup = "dr-lee"
[[practice.clinician]]
id = "dr-ortiz"
name = "Dr. Ana Ortiz"
phone = "+15555550101"
[[practice.clinician]]
id = "dr-lee"
name = "Dr. Sam Lee"
phone = "+15555550102"
[[practice.shift]]
clinician = "dr-ortiz"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "00:00"
end = "12:00"
[[practice.shift]]
clinician = "dr-ortiz"
days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
start = "12:00"
end = "00:00"
"#;

/// Tests in one binary run in parallel threads: one makes the venv.
fn ensure_moto() -> PathBuf {
    static SERVER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SERVER.get_or_init(make_moto_venv).clone()
}

fn make_moto_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
    let server = venv.join("bin").join("moto_server");
    let marker = venv.join("crisisd-installed");
    if server.exists() && std::fs::read_to_string(&marker).is_ok_and(|m| m == MOTO) {
        return server;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 -m venv {} failed: the paging tests need python3 with venv",
        venv.display()
    );
    let out = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", MOTO])
        .output()
        .expect("run pip");
    assert!(
        out.status.success(),
        "pip install {MOTO} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&marker, MOTO).expect("marker");
    server
}

pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start(port: u16) -> Moto {
        let server = ensure_moto();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let m = Moto { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/moto-api/data.json").is_none() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // moto loads its SNS backend on the first SNS request, which then
        // takes most of a second and holds the requests behind it: that is
        // moto's start-up, not the pager's latency, so it is paid here. An
        // unsigned ListTopics (moto routes by the credential scope and does
        // not check the signature) sends no SMS.
        let scope = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/sns/aws4_request, \
                     SignedHeaders=host, Signature=0";
        let warm = http_with(
            port,
            "POST",
            "/",
            &[
                ("Authorization", scope),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            "Action=ListTopics&Version=2010-03-31",
        );
        assert!(
            warm.is_some_and(|b| b.contains("ListTopicsResponse")),
            "moto's SNS did not answer"
        );
        m
    }

    /// (phone number, message) of every SMS moto accepted.
    pub fn sms(&self) -> Vec<(String, String)> {
        let body = http(self.port, "GET", "/moto-api/data.json").unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["sns"]["SMS"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["phone_number"].as_str().unwrap_or_default().to_string(),
                            m["message"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until at least `n` SMS are there.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<(String, String)> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.sms();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
