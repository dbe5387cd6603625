//! The session's egress rules (schema `NetRule`, `NetPolicy` in
//! capvisor.capnp) in Rust form, how a request is judged against them, and
//! the `NetPolicy` server over the shared, live rule list.
//!
//! Semantics (docs/decisions.md, "Egress policy"):
//! - A request is `(host, port, scheme, method, path)`; `host` is what the
//!   guest named (a DNS name, or a dotted IPv4 literal), compared
//!   case-insensitively.
//! - A rule matches when every non-empty field does: `host` is a glob
//!   (`*` any host; `*.example.org` any name below `example.org`, not the
//!   apex itself; anything else exact), `port` 0 is any port, `scheme` ""
//!   is any, `method` and `pathPrefix` "" are any.
//! - The first matching rule decides; no match is deny.
//! - A connection is judged at `connect` on `(host, port)` alone when no
//!   rule that could match it depends on scheme, method or path
//!   ([`Policy::needs_peek`]); otherwise the proxy first reads the guest's
//!   first bytes (`crate::peek`) and judges the request they show: a TLS
//!   ClientHello is scheme `https`, an HTTP/1.x request line scheme `http`
//!   with its method and path, anything else scheme `tcp` with no method
//!   and no path (so a rule naming a method or a path prefix does not
//!   match it).
//! - `ask` holds the connection until an approver decides
//!   (`crate::approvals`) or the approval times out (deny).
//! - DNS ([`Policy::may_resolve`]): a name resolves for the guest when some
//!   `allow` or `ask` rule's host glob matches it (ports and schemes are
//!   judged at connect).

use capvisor_rpc::{CvError, CvResult};
use capvisor_schema::capvisor_capnp::{net_policy, net_rule, NetAction};
use std::cell::RefCell;
use std::rc::Rc;

/// Rules one policy may hold (`NetPolicy.set`, `ProxyConfig.rules`).
pub const MAX_RULES: usize = 1024;
/// Longest DNS name (RFC 1035 2.3.4: 255 octets on the wire, 253 as text).
pub use capvisor_rpc::hostglob::MAX_HOST;
/// Longest `pathPrefix` of a rule, bytes.
pub const MAX_PATH_PREFIX: usize = 1024;
/// Longest `method` of a rule, bytes.
pub const MAX_METHOD: usize = 32;

/// What a matching rule does (schema `NetAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The request goes upstream.
    Allow,
    /// Refused with `denied`.
    Deny,
    /// Held until an approver decides (`crate::approvals`); a timeout
    /// denies.
    Ask,
}

impl Action {
    /// The schema value.
    pub fn to_capnp(self) -> NetAction {
        match self {
            Action::Allow => NetAction::Allow,
            Action::Deny => NetAction::Deny,
            Action::Ask => NetAction::Ask,
        }
    }

    /// From the schema value.
    pub fn from_capnp(a: NetAction) -> Self {
        match a {
            NetAction::Allow => Action::Allow,
            NetAction::Deny => Action::Deny,
            NetAction::Ask => Action::Ask,
        }
    }

    /// `allow`, `deny` or `ask` (the schema names).
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Ask => "ask",
        }
    }
}

/// What the proxy saw of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// A TCP stream the proxy did not look into.
    Tcp,
    /// HTTP/1.x in clear.
    Http,
    /// TLS, judged by SNI (and by its HTTP requests when intercepted).
    Https,
}

impl Scheme {
    /// `tcp`, `http`, `https`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One request to judge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// The host the guest named: a lower-case DNS name without the final
    /// dot, or a dotted IPv4 literal.
    pub host: &'a str,
    /// Upstream TCP port.
    pub port: u16,
    /// What the proxy saw.
    pub scheme: Scheme,
    /// HTTP method, when an HTTP request was seen.
    pub method: Option<&'a str>,
    /// HTTP request path, when an HTTP request was seen.
    pub path: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A bare TCP connection to `host`:`port` (scheme `tcp`, no HTTP).
    pub fn connection(host: &'a str, port: u16) -> Self {
        Self { host, port, scheme: Scheme::Tcp, method: None, path: None }
    }
}

/// One validated rule (schema `NetRule`); `host` is stored lower-case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Host glob: `*`, `*.<dns name>`, a DNS name or a dotted IPv4 literal.
    pub host: String,
    /// 0: any.
    pub port: u16,
    /// "", `tcp`, `http` or `https`.
    pub scheme: String,
    /// "" or an upper-case HTTP method token (scheme `http`/`https` only).
    pub method: String,
    /// "" or a path starting with `/` (scheme `http`/`https` only).
    pub path_prefix: String,
    /// What a match does.
    pub action: Action,
    /// TLS to this host is never intercepted.
    pub no_mitm: bool,
}

impl Rule {
    /// A rule for `host` (any port, scheme, method, path) doing `action`.
    pub fn host(host: &str, action: Action) -> Self {
        Rule {
            host: host.to_ascii_lowercase(),
            port: 0,
            scheme: String::new(),
            method: String::new(),
            path_prefix: String::new(),
            action,
            no_mitm: false,
        }
    }

    /// This rule limited to `port`.
    pub fn on_port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// True when the host glob is a wildcard (`*` or `*.domain`), false
    /// when it names one host.
    pub fn is_wildcard(&self) -> bool {
        self.host.starts_with('*')
    }

    /// Whether this rule looks past `(host, port)`: it names a scheme
    /// (even `tcp`: a TLS or HTTP stream does not match it), a method or a
    /// path prefix.
    pub fn depends_on_content(&self) -> bool {
        !self.scheme.is_empty() || !self.method.is_empty() || !self.path_prefix.is_empty()
    }

    /// Whether this rule matches `req` (see the module docs).
    pub fn matches(&self, req: &Request<'_>) -> bool {
        host_matches(&self.host, req.host)
            && (self.port == 0 || self.port == req.port)
            && (self.scheme.is_empty() || self.scheme == req.scheme.name())
            && (self.method.is_empty() || req.method.is_some_and(|m| m.eq_ignore_ascii_case(&self.method)))
            && (self.path_prefix.is_empty() || req.path.is_some_and(|p| p.starts_with(&self.path_prefix)))
    }

    /// Checks the rule's fields (see [`Rule`]); `index` names it in the error.
    ///
    /// Errors: `invalidArgument` "rule N: FIELD ..." for the first bad field.
    pub fn validate(&self, index: usize) -> CvResult<()> {
        let bad = |field: &str, why: String| Err(CvError::invalid(format!("rule {index}: {field}: {why}")));
        if !valid_glob(&self.host) {
            return bad(
                "host",
                format!("{:?} is not \"*\", \"*.<domain>\", a DNS name or a dotted IPv4 address", self.host),
            );
        }
        if !["", "tcp", "http", "https"].contains(&self.scheme.as_str()) {
            return bad("scheme", format!("{:?} is not \"\", \"tcp\", \"http\" or \"https\"", self.scheme));
        }
        let http = self.scheme == "http" || self.scheme == "https";
        if !self.method.is_empty() {
            if !http {
                return bad("method", "needs scheme \"http\" or \"https\"".into());
            }
            if self.method.len() > MAX_METHOD || !self.method.bytes().all(|b| b.is_ascii_uppercase()) {
                return bad("method", format!("{:?} is not an upper-case HTTP method", self.method));
            }
        }
        if !self.path_prefix.is_empty() {
            if !http {
                return bad("pathPrefix", "needs scheme \"http\" or \"https\"".into());
            }
            if self.path_prefix.len() > MAX_PATH_PREFIX
                || !self.path_prefix.starts_with('/')
                || !self.path_prefix.bytes().all(|b| b.is_ascii_graphic())
            {
                return bad(
                    "pathPrefix",
                    format!("must start with '/' and be at most {MAX_PATH_PREFIX} printable ASCII bytes"),
                );
            }
        }
        if self.no_mitm && (!self.method.is_empty() || !self.path_prefix.is_empty()) {
            return bad("noMitm", "a rule that is never intercepted cannot judge a method or path".into());
        }
        Ok(())
    }

    /// Reads and validates rule `index` from the schema.
    ///
    /// Errors: `invalidArgument` naming the rule and field (text that is
    /// not UTF-8, an action this proxy does not know, see [`Rule::validate`]).
    pub fn read(r: net_rule::Reader<'_>, index: usize) -> CvResult<Rule> {
        let text = |field: &str, t: capnp::Result<capnp::text::Reader<'_>>| -> CvResult<String> {
            t.ok()
                .and_then(|t| t.to_str().ok().map(str::to_string))
                .ok_or_else(|| CvError::invalid(format!("rule {index}: {field}: not UTF-8 text")))
        };
        let action =
            r.get_action().map_err(|_| CvError::invalid(format!("rule {index}: action: not a known NetAction")))?;
        let rule = Rule {
            host: text("host", r.get_host())?.to_ascii_lowercase(),
            port: r.get_port(),
            scheme: text("scheme", r.get_scheme())?,
            method: text("method", r.get_method())?,
            path_prefix: text("pathPrefix", r.get_path_prefix())?,
            action: Action::from_capnp(action),
            no_mitm: r.get_no_mitm(),
        };
        rule.validate(index)?;
        Ok(rule)
    }

    /// Writes the rule into a schema builder.
    pub fn write(&self, mut b: net_rule::Builder<'_>) {
        b.set_host(&self.host);
        b.set_port(self.port);
        b.set_scheme(&self.scheme);
        b.set_method(&self.method);
        b.set_path_prefix(&self.path_prefix);
        b.set_action(self.action.to_capnp());
        b.set_no_mitm(self.no_mitm);
    }
}

/// Reads and validates a rule list (`NetPolicy.set`, `ProxyConfig.rules`).
///
/// Errors: `invalidArgument` for more than [`MAX_RULES`] rules or the
/// first bad rule (its index and field).
pub fn read_rules(list: capnp::struct_list::Reader<'_, net_rule::Owned>) -> CvResult<Vec<Rule>> {
    if list.len() as usize > MAX_RULES {
        return Err(CvError::invalid(format!("{} rules; at most {MAX_RULES}", list.len())));
    }
    list.iter().enumerate().map(|(i, r)| Rule::read(r, i)).collect()
}

// Host globs have one home, shared with the broker's secret hosts.
use capvisor_rpc::hostglob::valid_glob;
pub use capvisor_rpc::hostglob::{host_matches, ipv4_literal, valid_dns_name};

/// The outcome of judging one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index of the deciding rule; `None`: no rule matched (default deny).
    pub rule: Option<usize>,
    /// What to do.
    pub action: Action,
    /// The deciding rule names the host exactly (no wildcard): only then
    /// may the connection reach a loopback, private, link-local or
    /// otherwise non-public address (`crate::resolve::non_public`).
    pub explicit: bool,
}

impl Decision {
    /// The rule index as `NetFlow.rule` has it (-1: none).
    pub fn rule_index(&self) -> i32 {
        self.rule.map_or(-1, |i| i32::try_from(i).unwrap_or(i32::MAX))
    }
}

/// An ordered, validated rule list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy of `rules`, in order.
    ///
    /// Errors: `invalidArgument` as [`Rule::validate`] and [`MAX_RULES`] say.
    pub fn new(rules: Vec<Rule>) -> CvResult<Self> {
        if rules.len() > MAX_RULES {
            return Err(CvError::invalid(format!("{} rules; at most {MAX_RULES}", rules.len())));
        }
        for (i, r) in rules.iter().enumerate() {
            r.validate(i)?;
        }
        Ok(Self { rules })
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Judges `req`: the first matching rule decides, none is deny.
    pub fn decide(&self, req: &Request<'_>) -> Decision {
        match self.rules.iter().position(|r| r.matches(req)) {
            Some(i) => {
                let r = &self.rules[i];
                Decision { rule: Some(i), action: r.action, explicit: !r.is_wildcard() }
            }
            None => Decision { rule: None, action: Action::Deny, explicit: false },
        }
    }

    /// Whether judging a connection to `host`:`port` needs the guest's
    /// first bytes: the first rule whose host glob and port match depends
    /// on scheme, method or path ([`Rule::depends_on_content`]). False:
    /// [`Policy::decide`] on [`Request::connection`] is the final answer
    /// (that rule decides whatever the stream holds, or no rule matches).
    pub fn needs_peek(&self, host: &str, port: u16) -> bool {
        self.rules
            .iter()
            .find(|r| host_matches(&r.host, host) && (r.port == 0 || r.port == port))
            .is_some_and(Rule::depends_on_content)
    }

    /// Whether TLS to `host`:`port` is relayed untouched: the first rule
    /// whose host glob and port match says `noMitm`.
    pub fn no_mitm(&self, host: &str, port: u16) -> bool {
        self.rules
            .iter()
            .find(|r| host_matches(&r.host, host) && (r.port == 0 || r.port == port))
            .is_some_and(|r| r.no_mitm)
    }

    /// Whether the guest's DNS query for `name` is answered: some `allow`
    /// or `ask` rule's host glob matches it.
    pub fn may_resolve(&self, name: &str) -> bool {
        self.rules.iter().any(|r| r.action != Action::Deny && host_matches(&r.host, name))
    }
}

/// The policy every VM of the session and the `NetPolicy` cap share; a
/// `set` is seen by every later decision.
pub type SharedPolicy = Rc<RefCell<Policy>>;

/// The `NetPolicy` server over the session's shared rules.
pub struct NetPolicyServer {
    policy: SharedPolicy,
}

impl NetPolicyServer {
    /// A `NetPolicy` client over `policy`.
    pub fn client(policy: SharedPolicy) -> net_policy::Client {
        capnp_rpc::new_client(Self { policy })
    }
}

impl net_policy::Server for NetPolicyServer {
    /// The rules in order (hosts lower-case).
    async fn get(
        self: capnp::capability::Rc<Self>,
        _: net_policy::GetParams,
        mut results: net_policy::GetResults,
    ) -> capnp::Result<()> {
        let policy = self.policy.borrow();
        let mut list = results.get().init_rules(policy.rules.len() as u32);
        for (i, r) in policy.rules.iter().enumerate() {
            r.write(list.reborrow().get(i as u32));
        }
        Ok(())
    }

    /// Replaces every rule for every later decision; connections already
    /// open stay. Errors: `invalidArgument` naming the first bad rule and
    /// field (the old rules stay).
    async fn set(
        self: capnp::capability::Rc<Self>,
        params: net_policy::SetParams,
        _: net_policy::SetResults,
    ) -> capnp::Result<()> {
        let rules = read_rules(params.get()?.get_rules()?)?;
        let n = rules.len();
        *self.policy.borrow_mut() = Policy { rules };
        tracing::info!(rules = n, "egress rules replaced");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rule(host: &str, action: Action) -> Rule {
        Rule::host(host, action)
    }

    #[test]
    fn host_globs() {
        assert!(host_matches("*", "anything.example"));
        assert!(host_matches("*.example.org", "a.example.org"));
        assert!(host_matches("*.example.org", "a.b.EXAMPLE.org"));
        assert!(!host_matches("*.example.org", "example.org"), "the apex is not a subdomain");
        assert!(!host_matches("*.example.org", "badexample.org"));
        assert!(!host_matches("*.example.org", "example.org.evil.test"));
        assert!(host_matches("Api.Test", "api.test"));
        assert!(!host_matches("api.test", "api.test.evil"));
        assert!(host_matches("10.1.2.3", "10.1.2.3"));
        assert!(!host_matches("10.1.2.3", "10.1.2.33"));
    }

    #[test]
    fn first_match_wins_and_no_match_denies() {
        let p = Policy::new(vec![
            rule("evil.example.org", Action::Deny),
            rule("*.example.org", Action::Allow).on_port(443),
            rule("*", Action::Ask),
        ])
        .unwrap();
        let d = p.decide(&Request::connection("evil.example.org", 443));
        assert_eq!((d.rule, d.action), (Some(0), Action::Deny));
        let d = p.decide(&Request::connection("www.example.org", 443));
        assert_eq!((d.rule, d.action, d.explicit), (Some(1), Action::Allow, false));
        let d = p.decide(&Request::connection("www.example.org", 80));
        assert_eq!((d.rule, d.action), (Some(2), Action::Ask));
        let empty = Policy::default();
        let d = empty.decide(&Request::connection("www.example.org", 443));
        assert_eq!((d.rule, d.action, d.rule_index()), (None, Action::Deny, -1));
    }

    #[test]
    fn http_only_rules_do_not_match_a_bare_connection() {
        let mut https = rule("api.test", Action::Deny);
        https.scheme = "https".into();
        let mut get = rule("api.test", Action::Deny);
        get.scheme = "http".into();
        get.method = "GET".into();
        let mut tcp = rule("api.test", Action::Allow);
        tcp.scheme = "tcp".into();
        let p = Policy::new(vec![https, get, tcp]).unwrap();
        let d = p.decide(&Request::connection("api.test", 443));
        assert_eq!((d.rule, d.action, d.explicit), (Some(2), Action::Allow, true));
        // The HTTP layer's requests do meet them.
        let req = Request {
            scheme: Scheme::Http,
            method: Some("GET"),
            path: Some("/"),
            ..Request::connection("api.test", 80)
        };
        assert_eq!(p.decide(&req).rule, Some(1));
    }

    #[test]
    fn peeking_is_needed_only_before_the_first_content_blind_match() {
        let http = |host: &str, port: u16| Rule {
            scheme: "http".into(),
            method: "GET".into(),
            ..rule(host, Action::Allow).on_port(port)
        };
        let tcp = |host: &str| Rule { scheme: "tcp".into(), ..rule(host, Action::Deny) };
        let p = Policy::new(vec![
            rule("fast.test", Action::Allow),
            http("*.test", 80),
            rule("*", Action::Deny).on_port(22),
            tcp("raw.test"),
        ])
        .unwrap();
        assert!(!p.needs_peek("fast.test", 80), "rule 0 decides before the http rule");
        assert!(p.needs_peek("web.test", 80));
        assert!(!p.needs_peek("web.test", 81), "the http rule is for port 80 only");
        assert!(!p.needs_peek("web.test", 22));
        assert!(p.needs_peek("raw.test", 9), "a tcp scheme rule does not match a TLS stream");
        assert!(!p.needs_peek("other.example", 9), "no rule: default deny at once");
        assert!(!Policy::default().needs_peek("a.test", 1));
    }

    #[test]
    fn resolve_needs_an_allow_or_ask_rule_for_the_name() {
        let p = Policy::new(vec![
            rule("blocked.test", Action::Deny),
            rule("*.pypi.test", Action::Allow),
            rule("maybe.test", Action::Ask),
        ])
        .unwrap();
        assert!(p.may_resolve("files.pypi.test"));
        assert!(p.may_resolve("maybe.test"));
        assert!(!p.may_resolve("pypi.test"));
        assert!(!p.may_resolve("blocked.test"));
        assert!(!p.may_resolve("other.test"));
    }

    #[test]
    fn validation_names_the_rule_and_field() {
        let err = |r: Rule| Policy::new(vec![rule("ok.test", Action::Allow), r]).unwrap_err();
        for (r, field) in [
            (rule("exa mple.org", Action::Allow), "rule 1: host"),
            (rule("a.*.org", Action::Allow), "rule 1: host"),
            (rule("*.1.2", Action::Allow), "rule 1: host"),
            (rule("", Action::Allow), "rule 1: host"),
            (Rule { scheme: "ftp".into(), ..rule("a.test", Action::Allow) }, "rule 1: scheme"),
            (Rule { method: "GET".into(), ..rule("a.test", Action::Allow) }, "rule 1: method"),
            (Rule { scheme: "http".into(), method: "get x".into(), ..rule("a.test", Action::Allow) }, "rule 1: method"),
            (
                Rule { scheme: "https".into(), path_prefix: "v1".into(), ..rule("a.test", Action::Allow) },
                "rule 1: pathPrefix",
            ),
            (
                Rule {
                    scheme: "https".into(),
                    path_prefix: "/v1".into(),
                    no_mitm: true,
                    ..rule("a.test", Action::Allow)
                },
                "rule 1: noMitm",
            ),
        ] {
            let e = err(r);
            assert_eq!(e.code, capvisor_schema::common_capnp::ErrorCode::InvalidArgument);
            assert!(e.message.starts_with(field), "{field}: {}", e.message);
        }
        let too_many = vec![rule("*", Action::Deny); MAX_RULES + 1];
        assert!(Policy::new(too_many).is_err());
        assert!(Policy::new(vec![rule("*", Action::Deny); MAX_RULES]).is_ok());
    }

    #[test]
    fn dns_names_and_literals() {
        assert!(valid_dns_name("api.test"));
        assert!(valid_dns_name("_dmarc.example.org"));
        assert!(!valid_dns_name("1.2.3.4"), "an IPv4 literal is not a DNS name");
        assert!(!valid_dns_name("a..b"));
        assert!(!valid_dns_name("-a.test"));
        assert!(!valid_dns_name(&format!("{}.test", "a".repeat(64))));
        assert!(!valid_dns_name(&"a.".repeat(127)));
        assert_eq!(ipv4_literal("169.254.169.254"), Some(Ipv4Addr::new(169, 254, 169, 254)));
        assert_eq!(ipv4_literal("010.0.0.1"), None);
        assert_eq!(ipv4_literal("10.1"), None);
    }
}
