//! The PostgreSQL the tests use: `CRISISD_TEST_DATABASE_URL` when set, else
//! a throwaway cluster this test binary starts itself (once, on a free
//! loopback port with a socket directory of its own) when the machine has
//! the server binaries (Debian's `postgresql` package). Each test gets a
//! schema of its own, so tests run in parallel. Without either, the
//! PostgreSQL tests say loudly that they did not run.
//!
//! The cluster is stopped and removed by a small watcher process once this
//! test binary exits: Rust's test harness has no hook for "after all tests".

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set to test against an existing server instead of a throwaway cluster.
pub const URL_VAR: &str = "CRISISD_TEST_DATABASE_URL";
/// Set (CI sets it) to fail, not skip, when there is no PostgreSQL.
pub const REQUIRE_VAR: &str = "CRISISD_TEST_REQUIRE_POSTGRES";

/// The test server: its base URL, and the CA that signed its TLS
/// certificate when this binary started it; or why there is none.
struct Server {
    url: String,
    ca: Option<PathBuf>,
}

fn server() -> &'static Result<Server, String> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    SERVER.get_or_init(|| match std::env::var(URL_VAR) {
        Ok(url) if !url.is_empty() => Ok(Server { url, ca: None }),
        _ => start_cluster(),
    })
}

/// The throwaway cluster's TLS: a CA, and a certificate it signed for
/// 127.0.0.1 and localhost. Returns the CA's path.
fn make_tls(dir: &Path) -> Result<PathBuf, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let e = |e: rcgen::Error| format!("making the test server's certificate: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(e)?).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .map_err(e)?
        .signed_by(&key, &ca)
        .map_err(e)?;
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("writing {name}: {e}"))
    };
    write("ca.pem", &ca.pem())?;
    write("server.crt", &cert.pem())?;
    write("server.key", &key.serialize_pem())?;
    // The server refuses a key others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .map_err(|e| format!("chmod server.key: {e}"))?;
    Ok(dir.join("ca.pem"))
}

/// Directory holding initdb and pg_ctl: Debian's newest, else PATH's.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program args…`, as the postgres user when we are root (initdb refuses
/// to run as root).
fn as_pg_user(root: bool, program: &Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start_cluster() -> Result<Server, String> {
    let Some(bin) = bin_dir() else {
        return Err(format!(
            "{URL_VAR} is not set and no PostgreSQL server binaries were found \
             (/usr/lib/postgresql/*/bin; apt-get install postgresql)"
        ));
    };
    let root = is_root();
    let dir = std::env::temp_dir().join(format!(
        "crisisd-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    ));
    let (data, sock) = (dir.join("data"), dir.join("sock"));
    std::fs::create_dir_all(&sock).map_err(|e| format!("making {}: {e}", dir.display()))?;
    let ca = make_tls(&dir)?;
    if root {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("chown postgres {} failed", dir.display()));
        }
    }
    let out = as_pg_user(root, &bin.join("initdb"))
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .arg("-D")
        .arg(&data)
        .output()
        .map_err(|e| format!("running initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let port = super::process::free_port();
    // Throwaway: durability off, connections for many parallel tests.
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
         -c full_page_writes=off -c max_connections=400 \
         -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        sock.display(),
        dir.join("server.crt").display(),
        dir.join("server.key").display(),
    );
    let out = as_pg_user(root, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-o", &opts, "-l"])
        .arg(dir.join("log"))
        .args(["-w", "-t", "30", "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("running pg_ctl: {e}"))?;
    if !out.success() {
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        return Err(format!("pg_ctl start failed: {log}"));
    }
    // Stops the cluster and removes it once this process is gone.
    let pg_ctl = bin.join("pg_ctl");
    let stop = if root {
        format!(
            "runuser -u postgres -- {} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    } else {
        format!(
            "{} -D {} -m immediate stop",
            pg_ctl.display(),
            data.display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the cluster's watcher: {e}"))?;
    Ok(Server {
        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        ca: Some(ca),
    })
}

/// Says, past the test harness's capture, that a test did not run.
fn not_run(test: &str, why: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n!!! NOT RUN on PostgreSQL: {test}: {why}\n"
    );
}

/// A URL for a schema of its own on the test server, or None (said loudly)
/// when there is no server.
pub fn database(test: &str) -> Option<String> {
    let base = match server() {
        Ok(s) => s.url.clone(),
        Err(why) if std::env::var_os(REQUIRE_VAR).is_some() => {
            panic!("{REQUIRE_VAR} is set and there is no PostgreSQL to test on: {why}")
        }
        Err(why) => {
            not_run(test, why);
            return None;
        }
    };
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let admin = base.clone();
    let created = {
        let schema = schema.clone();
        // A thread of its own: callable from sync tests and from inside a
        // runtime alike.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match sqlx::PgPool::connect(&admin).await {
                        Ok(pool) => {
                            let r = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                                "CREATE SCHEMA {schema}"
                            )))
                            .execute(&pool)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string());
                            pool.close().await;
                            return r;
                        }
                        Err(e) if Instant::now() > deadline => return Err(e.to_string()),
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        })
        .join()
        .map_err(|_| "creating the schema panicked".to_string())
        .and_then(|r| r)
    };
    if let Err(e) = created {
        panic!("creating a test schema on the PostgreSQL server failed: {e}");
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

/// The CA of the throwaway cluster's certificate; None on a server given
/// by URL (its TLS is its own business) or when there is no server.
pub fn tls_root() -> Option<PathBuf> {
    server().as_ref().ok().and_then(|s| s.ca.clone())
}

/// A store config for `url`, sized for tests.
pub fn store_config(url: &str) -> crisisd::config::StoreConfig {
    crisisd::config::StoreConfig {
        url: url.to_string(),
        max_connections: 8,
        ..Default::default()
    }
}
