//! Parsing and validation of the services file (pure: text in, services or
//! located errors out). The schema is in `docs/services-file.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    EndpointSpec, LocalService, LocalServices, Port, ProbeCheck, ProbeSpec, Protocol, ServiceType,
    DEFAULT_EXPECTED_STATUS, DEFAULT_HEALTHY_THRESHOLD, DEFAULT_PROBE_INTERVAL,
    DEFAULT_PROBE_TIMEOUT, DEFAULT_UNHEALTHY_THRESHOLD,
};

/// Largest services file accepted, in bytes (4 MiB); checked before reading.
pub const MAX_FILE_LEN: u64 = 4 * 1024 * 1024;
/// Largest probe interval, in ms (1 hour).
const MAX_INTERVAL_MS: i64 = 3_600_000;
/// Largest probe threshold.
const MAX_THRESHOLD: i64 = 1000;
/// Longest HTTP probe path or Host header, in bytes.
const MAX_HTTP_TEXT: usize = 1024;

/// One problem in a services file, located by line, column and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// Path of the field, e.g. `services[1].endpoints[0].address`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a services file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be read.
    #[error("services file {file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_FILE_LEN`].
    #[error("services file {file}: {len} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// The file.
        file: PathBuf,
        /// Its length in bytes.
        len: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// The file is not valid TOML or does not match the schema's types
    /// (unknown field, missing field, wrong type).
    #[error("services file {file}: line {line}, column {column} (`{text}`): {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column (0 when unknown).
        column: usize,
        /// The parser's message (names the field where it can).
        message: String,
        /// The offending line, trimmed (at most 80 characters), which shows
        /// the key when the message does not.
        text: String,
    },
    /// The file parses but breaks the schema's rules.
    #[error("{}", format_problems(file, problems))]
    Invalid {
        /// The file.
        file: PathBuf,
        /// Every problem found, in file order.
        problems: Vec<Problem>,
    },
}

fn format_problems(file: &Path, problems: &[Problem]) -> String {
    let mut s = format!("services file {} is invalid:", file.display());
    for p in problems {
        let _ = write!(
            s,
            "\n  line {}, column {}, field `{}`: {}",
            p.line, p.column, p.field, p.message
        );
    }
    s
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    namespace: Spanned<String>,
    name: Spanned<String>,
    #[serde(rename = "type", default)]
    service_type: Option<RawType>,
    #[serde(default)]
    ports: Vec<Spanned<RawPort>>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
    probe: Option<Spanned<RawProbe>>,
}

#[derive(Deserialize, Clone, Copy)]
enum RawType {
    ClusterSetIP,
    Headless,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    name: Option<Spanned<String>>,
    port: Spanned<i64>,
    #[serde(default)]
    protocol: Option<RawProtocol>,
}

#[derive(Deserialize, Clone, Copy)]
enum RawProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: Spanned<String>,
    port: Spanned<i64>,
    hostname: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum RawProbeKind {
    Tcp,
    Http,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    kind: RawProbeKind,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    expected_status: Option<Spanned<i64>>,
    host: Option<Spanned<String>>,
    interval_ms: Option<Spanned<i64>>,
    timeout_ms: Option<Spanned<i64>>,
    healthy_threshold: Option<Spanned<i64>>,
    unhealthy_threshold: Option<Spanned<i64>>,
}

/// Turns byte offsets into 1-based line and column.
struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        (line, column)
    }
}

struct Checker<'a> {
    loc: Locator<'a>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(
        &mut self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = self.loc.line_col(span.start);
        self.problems.push(Problem {
            line,
            column,
            field: field.into(),
            message: message.into(),
        });
    }

    fn dns_label(&mut self, v: &Spanned<String>, field: &str) -> String {
        if let Err(m) = check_dns_label(v.get_ref()) {
            self.problem(v.span(), field, m);
        }
        v.get_ref().clone()
    }

    fn port(&mut self, v: &Spanned<i64>, field: &str) -> u16 {
        match u16::try_from(*v.get_ref()) {
            Ok(p) if p >= 1 => p,
            _ => {
                self.problem(
                    v.span(),
                    field,
                    format!("port {} is out of range 1..=65535", v.get_ref()),
                );
                0
            }
        }
    }

    fn int_in(&mut self, v: &Spanned<i64>, field: &str, range: Range<i64>, unit: &str) -> i64 {
        let x = *v.get_ref();
        if !range.contains(&x) {
            self.problem(
                v.span(),
                field,
                format!(
                    "{x}{unit} is out of range {}..={}{unit}",
                    range.start,
                    range.end - 1
                ),
            );
            return range.start;
        }
        x
    }

    fn http_text(&mut self, v: &Spanned<String>, field: &str, what: &str) {
        let s = v.get_ref();
        if s.is_empty() || s.len() > MAX_HTTP_TEXT {
            self.problem(
                v.span(),
                field,
                format!("{what} must be 1 to {MAX_HTTP_TEXT} bytes"),
            );
        } else if !s.bytes().all(|b| b.is_ascii_graphic()) {
            self.problem(
                v.span(),
                field,
                format!("{what} may contain only visible ASCII characters (no spaces)"),
            );
        }
    }
}

/// Checks an RFC 1123 DNS label: 1 to 63 characters, lowercase letters,
/// digits and `-`, starting and ending with a letter or digit.
pub(crate) fn check_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("{s:?} must be 1 to 63 characters (a DNS label)"));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !s.chars().all(ok_char) || s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{s:?} is not a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// Parses and validates the text of a services file. `file` only names the
/// file in errors. Every problem is reported, not only the first.
pub fn parse_services(file: &Path, text: &str) -> Result<LocalServices, SourceError> {
    let loc = Locator { text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((0, 0), |s| loc.line_col(s.start));
        SourceError::Syntax {
            file: file.to_path_buf(),
            line,
            column,
            message: e.message().trim_end().to_string(),
            text: line
                .checked_sub(1)
                .and_then(|i| text.lines().nth(i))
                .unwrap_or("")
                .trim()
                .chars()
                .take(80)
                .collect(),
        }
    })?;
    let mut c = Checker {
        loc,
        problems: Vec::new(),
    };
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, svc) in raw.services.iter().enumerate() {
        let s = service(&mut c, i, svc.get_ref());
        let key = (s.namespace.clone(), s.name.clone());
        if let Some(first) = seen.get(&key) {
            let (first_line, _) = c.loc.line_col(*first);
            c.problem(
                svc.get_ref().name.span(),
                format!("services[{i}].name"),
                format!(
                    "duplicate service {}/{} (first defined at line {first_line})",
                    key.0, key.1
                ),
            );
        } else {
            seen.insert(key, svc.span().start);
        }
        services.push(s);
    }
    if !c.problems.is_empty() {
        c.problems.sort_by_key(|p| (p.line, p.column));
        return Err(SourceError::Invalid {
            file: file.to_path_buf(),
            problems: c.problems,
        });
    }
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Ok(LocalServices { services })
}

fn service(c: &mut Checker<'_>, i: usize, raw: &RawService) -> LocalService {
    let f = |rest: &str| format!("services[{i}].{rest}");
    let namespace = c.dns_label(&raw.namespace, &f("namespace"));
    let name = c.dns_label(&raw.name, &f("name"));
    let service_type = match raw.service_type {
        None | Some(RawType::ClusterSetIP) => ServiceType::ClusterSetIP,
        Some(RawType::Headless) => ServiceType::Headless,
    };

    let mut ports = Vec::with_capacity(raw.ports.len());
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (j, p) in raw.ports.iter().enumerate() {
        let rp = p.get_ref();
        let port = c.port(&rp.port, &f(&format!("ports[{j}].port")));
        let protocol = match rp.protocol {
            None | Some(RawProtocol::Tcp) => Protocol::Tcp,
            Some(RawProtocol::Udp) => Protocol::Udp,
        };
        let name = rp.name.as_ref().map(|n| {
            let field = f(&format!("ports[{j}].name"));
            let name = c.dns_label(n, &field);
            if !names.insert(name.clone()) {
                c.problem(n.span(), field, format!("duplicate port name {name:?}"));
            }
            name
        });
        if name.is_none() && raw.ports.len() > 1 {
            c.problem(
                p.span(),
                f(&format!("ports[{j}].name")),
                "a service with several ports needs a name on every port",
            );
        }
        if port != 0 && !numbers.insert((port, protocol)) {
            c.problem(
                rp.port.span(),
                f(&format!("ports[{j}].port")),
                format!("duplicate port {port}/{protocol:?}"),
            );
        }
        ports.push(Port {
            name,
            port,
            protocol,
        });
    }
    if ports.is_empty() && service_type == ServiceType::ClusterSetIP {
        c.problem(
            raw.name.span(),
            f("ports"),
            "a ClusterSetIP service needs at least one port",
        );
    }

    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    let mut addrs = BTreeSet::new();
    for (j, e) in raw.endpoints.iter().enumerate() {
        let re = e.get_ref();
        let address = match re.address.get_ref().parse::<IpAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                c.problem(
                    re.address.span(),
                    f(&format!("endpoints[{j}].address")),
                    format!("{:?} is not an IP address", re.address.get_ref()),
                );
                None
            }
        };
        let port = c.port(&re.port, &f(&format!("endpoints[{j}].port")));
        let hostname = re
            .hostname
            .as_ref()
            .map(|h| c.dns_label(h, &f(&format!("endpoints[{j}].hostname"))));
        if let Some(address) = address {
            if port != 0 && !addrs.insert((address, port)) {
                c.problem(
                    e.span(),
                    f(&format!("endpoints[{j}]")),
                    format!(
                        "duplicate endpoint {}",
                        std::net::SocketAddr::new(address, port)
                    ),
                );
            }
            endpoints.push(EndpointSpec {
                address,
                port,
                hostname,
            });
        }
    }

    let probe = match &raw.probe {
        None => ProbeSpec::default(),
        Some(p) => probe(c, i, p.get_ref()),
    };
    LocalService {
        namespace,
        name,
        service_type,
        ports,
        endpoints,
        probe,
    }
}

fn probe(c: &mut Checker<'_>, i: usize, raw: &RawProbe) -> ProbeSpec {
    let f = |rest: &str| format!("services[{i}].probe.{rest}");
    let port = raw.port.as_ref().map(|p| c.port(p, &f("port")));
    let check = match raw.kind {
        RawProbeKind::Tcp => {
            for (name, span) in [
                ("path", raw.path.as_ref().map(|v| v.span())),
                (
                    "expected_status",
                    raw.expected_status.as_ref().map(|v| v.span()),
                ),
                ("host", raw.host.as_ref().map(|v| v.span())),
            ] {
                if let Some(span) = span {
                    c.problem(span, f(name), "only allowed with kind = \"http\"");
                }
            }
            ProbeCheck::Tcp { port }
        }
        RawProbeKind::Http => {
            let path = match &raw.path {
                Some(p) => {
                    c.http_text(p, &f("path"), "path");
                    if !p.get_ref().starts_with('/') {
                        c.problem(p.span(), f("path"), "path must start with '/'");
                    }
                    p.get_ref().clone()
                }
                None => "/".to_string(),
            };
            let expected_status = raw
                .expected_status
                .as_ref()
                .map_or(DEFAULT_EXPECTED_STATUS, |s| {
                    c.int_in(s, &f("expected_status"), 100..600, "") as u16
                });
            let host = raw.host.as_ref().map(|h| {
                c.http_text(h, &f("host"), "host");
                h.get_ref().clone()
            });
            ProbeCheck::Http {
                path,
                expected_status,
                port,
                host,
            }
        }
    };
    let interval_ms = raw
        .interval_ms
        .as_ref()
        .map_or(DEFAULT_PROBE_INTERVAL.as_millis() as i64, |v| {
            c.int_in(v, &f("interval_ms"), 1..MAX_INTERVAL_MS + 1, " ms")
        });
    let timeout_ms = match &raw.timeout_ms {
        Some(v) => {
            let t = c.int_in(v, &f("timeout_ms"), 1..MAX_INTERVAL_MS + 1, " ms");
            if t > interval_ms {
                c.problem(
                    v.span(),
                    f("timeout_ms"),
                    format!("timeout {t} ms is longer than the interval {interval_ms} ms"),
                );
            }
            t
        }
        None => interval_ms.min(DEFAULT_PROBE_TIMEOUT.as_millis() as i64),
    };
    let healthy_threshold = raw
        .healthy_threshold
        .as_ref()
        .map_or(DEFAULT_HEALTHY_THRESHOLD, |v| {
            c.int_in(v, &f("healthy_threshold"), 1..MAX_THRESHOLD + 1, "") as u32
        });
    let unhealthy_threshold = raw
        .unhealthy_threshold
        .as_ref()
        .map_or(DEFAULT_UNHEALTHY_THRESHOLD, |v| {
            c.int_in(v, &f("unhealthy_threshold"), 1..MAX_THRESHOLD + 1, "") as u32
        });
    ProbeSpec {
        check,
        interval: Duration::from_millis(interval_ms.max(1) as u64),
        timeout: Duration::from_millis(timeout_ms.max(1) as u64),
        healthy_threshold,
        unhealthy_threshold,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[services]]
namespace = "shop"
name = "cart"
type = "ClusterSetIP"
ports = [
  { name = "http", port = 80 },
  { name = "dns", port = 53, protocol = "UDP" },
]
endpoints = [
  { address = "10.0.0.5", port = 8080, hostname = "cart-0" },
  { address = "fd00::5", port = 8080 },
]
[services.probe]
kind = "http"
path = "/healthz"
expected_status = 204
interval_ms = 2000
timeout_ms = 700
healthy_threshold = 1
unhealthy_threshold = 2

[[services]]
namespace = "shop"
name = "db"
type = "Headless"
endpoints = [{ address = "10.0.0.9", port = 5432 }]
"#;

    fn parse(text: &str) -> Result<LocalServices, SourceError> {
        parse_services(Path::new("services.toml"), text)
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(SourceError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn example_parses() {
        let s = parse(EXAMPLE).unwrap();
        assert_eq!(s.services.len(), 2);
        let cart = s.get("shop", "cart").unwrap();
        assert_eq!(cart.service_type, ServiceType::ClusterSetIP);
        assert_eq!(
            cart.ports[1],
            Port {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp
            }
        );
        assert_eq!(
            cart.endpoints[1].address,
            "fd00::5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(cart.endpoints[0].hostname.as_deref(), Some("cart-0"));
        assert_eq!(
            cart.probe,
            ProbeSpec {
                check: ProbeCheck::Http {
                    path: "/healthz".into(),
                    expected_status: 204,
                    port: None,
                    host: None
                },
                interval: Duration::from_millis(2000),
                timeout: Duration::from_millis(700),
                healthy_threshold: 1,
                unhealthy_threshold: 2,
            }
        );
        let db = s.get("shop", "db").unwrap();
        assert_eq!(db.service_type, ServiceType::Headless);
        assert!(db.ports.is_empty());
        assert_eq!(db.probe, ProbeSpec::default());
    }

    /// The example in `docs/services-file.md` stays valid.
    #[test]
    fn documented_example_parses() {
        let doc = include_str!("../../../../docs/services-file.md");
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let len = doc[start..].find("```").unwrap();
        let s = parse(&doc[start..start + len]).unwrap();
        assert_eq!(s.services.len(), 2);
        let cart = s.get("shop", "cart").unwrap();
        assert_eq!(cart.endpoints.len(), 3);
        assert!(matches!(
            cart.probe.check,
            ProbeCheck::Http {
                port: Some(8081),
                ..
            }
        ));
        assert_eq!(s.get("shop", "db").unwrap().probe, ProbeSpec::default());
    }

    #[test]
    fn empty_file_is_no_services() {
        assert_eq!(parse("").unwrap(), LocalServices::default());
    }

    #[test]
    fn sorted_by_key() {
        let s = parse(
            r#"
[[services]]
namespace = "b"
name = "x"
ports = [{ port = 1 }]
[[services]]
namespace = "a"
name = "y"
ports = [{ port = 1 }]
"#,
        )
        .unwrap();
        assert_eq!(s.services[0].namespace, "a");
        assert!(s.get("b", "x").is_some());
        assert!(s.get("c", "x").is_none());
    }

    #[test]
    fn bad_names_ports_and_addresses_are_located() {
        let text = r#"
[[services]]
namespace = "Shop"
name = "cart"
ports = [{ port = 0 }]
endpoints = [{ address = "10.0.0.300", port = 70000 }]
"#;
        let p = problems(text);
        let fields: Vec<_> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "services[0].namespace",
                "services[0].ports[0].port",
                "services[0].endpoints[0].address",
                "services[0].endpoints[0].port",
            ]
        );
        assert_eq!((p[0].line, p[0].column), (3, 13));
        assert_eq!(p[1].line, 5);
        assert_eq!(p[2].line, 6);
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.contains("services.toml"), "{msg}");
        assert!(
            msg.contains("line 3, column 13, field `services[0].namespace`"),
            "{msg}"
        );
    }

    #[test]
    fn duplicates_are_refused() {
        let p = problems(
            r#"
[[services]]
namespace = "a"
name = "x"
ports = [{ name = "p", port = 1 }, { name = "p", port = 1 }]
endpoints = [{ address = "10.0.0.1", port = 1 }, { address = "10.0.0.1", port = 1 }]
[[services]]
namespace = "a"
name = "x"
ports = [{ port = 1 }]
"#,
        );
        let msgs: Vec<_> = p.iter().map(|p| p.message.as_str()).collect();
        assert!(
            msgs.iter().any(|m| m.contains("duplicate port name")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter().any(|m| m.contains("duplicate port 1/Tcp")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("duplicate endpoint 10.0.0.1:1")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("duplicate service a/x (first defined at line 2)")),
            "{msgs:?}"
        );
    }

    #[test]
    fn rules_on_ports() {
        // Several ports need names; ClusterSetIP needs a port.
        let p = problems(
            r#"
[[services]]
namespace = "a"
name = "x"
ports = [{ port = 1 }, { port = 2 }]
[[services]]
namespace = "a"
name = "y"
"#,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[2].field, "services[1].ports");
    }

    #[test]
    fn probe_rules() {
        let p = problems(
            r#"
[[services]]
namespace = "a"
name = "x"
ports = [{ port = 1 }]
[services.probe]
kind = "tcp"
path = "/x"
interval_ms = 100
timeout_ms = 200
healthy_threshold = 0
"#,
        );
        let fields: Vec<_> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "services[0].probe.path",
                "services[0].probe.timeout_ms",
                "services[0].probe.healthy_threshold"
            ]
        );
        let p = problems(
            r#"
[[services]]
namespace = "a"
name = "x"
ports = [{ port = 1 }]
probe = { kind = "http", path = "no-slash", expected_status = 999, host = "a b" }
"#,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        // Default timeout never exceeds a short interval.
        let s = parse(
            r#"
[[services]]
namespace = "a"
name = "x"
ports = [{ port = 1 }]
probe = { kind = "http", interval_ms = 100 }
"#,
        )
        .unwrap();
        let probe = &s.services[0].probe;
        assert_eq!(probe.timeout, Duration::from_millis(100));
        assert!(
            matches!(&probe.check, ProbeCheck::Http { path, expected_status: 200, .. } if path == "/")
        );
    }

    #[test]
    fn syntax_and_schema_errors_have_a_line() {
        for (text, line, needle) in [
            ("[[services]\n", 1, ""),
            ("[[services]]\nnamespace = \"a\"\nnmae = \"x\"\n", 3, "nmae"),
            (
                "[[services]]\nnamespace = \"a\"\nname = \"x\"\ntype = \"Nodeport\"\n",
                4,
                "Nodeport",
            ),
            (
                "[[services]]\nnamespace = \"a\"\nname = \"x\"\nports = [{ port = \"80\" }]\n",
                4,
                "",
            ),
        ] {
            match parse(text) {
                Err(SourceError::Syntax {
                    line: l,
                    message,
                    text: shown,
                    ..
                }) => {
                    assert_eq!(l, line, "{text}: {message}");
                    assert_eq!(
                        Some(shown.as_str()),
                        text.lines().nth(line - 1).map(str::trim)
                    );
                    assert!(message.contains(needle), "{message}");
                }
                other => panic!("{text}: expected Syntax, got {other:?}"),
            }
        }
    }

    #[test]
    fn dns_labels() {
        for ok in ["a", "a-b", "0a", &"a".repeat(63)] {
            assert!(check_dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
    }
}
