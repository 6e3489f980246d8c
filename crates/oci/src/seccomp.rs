//! The container's seccomp profile (`linux.seccomp`) compiled into the BPF programs the
//! guest agent installs on the container's processes, as runc installs the profile with
//! libseccomp: defence in depth inside the VM (the VM is the boundary).
//!
//! A profile is a default action and rules of other actions. seccompiler compiles one
//! action on a match and one on a mismatch per filter, so the profile becomes a stack,
//! which the kernel runs whole, taking the most restrictive answer: a base filter that
//! answers the default action for any call no rule matches (the rules, with their
//! argument conditions, answer "allow" there), and one filter per other action that
//! answers it for that action's rules ("allow" for the rest). As runc builds the rules:
//! names this kernel's table lacks (32-bit, another architecture's) are left out with
//! one warning, a rule of the default action is skipped, an argument named twice makes
//! one rule per condition, a masked comparison that can never match is left out.
//! `SCMP_ACT_NOTIFY` (a listener on the host), an `errnoRet` over 4095, and more
//! filters or instructions than the agent and the kernel take are refused. Only x86-64
//! calls are filtered: a 32-bit call ends the process; calls newer than the profile get
//! its default action, where runc answers `ENOSYS`.

use std::collections::BTreeMap;
use std::str::FromStr;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator, LinuxSyscall};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The errno `SCMP_ACT_ERRNO` returns when the profile names none (libseccomp's).
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

/// A compiled profile: its programs, in the order to install them (hex, as the guest
/// agent's protocol carries them), and what was left out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// One hex string per program: 16 digits per instruction (code, jt, jf, k).
    pub filters: Vec<String>,
    /// One line per name left out.
    pub warnings: Vec<String>,
}

/// Compiles `profile` (see the module documentation); an error names what cannot be
/// honoured.
pub fn compile(profile: &LinuxSeccomp) -> Result<Compiled, String> {
    let default = action(
        profile.default_action(),
        profile.default_errno_ret(),
        "defaultAction",
    )?;
    if profile.listener_path().is_some() {
        return Err("listenerPath: a seccomp listener on the host cannot reach the VM".into());
    }
    let mut warnings = Vec::new();
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        warnings.push("linux.seccomp.flags are not applied in the guest".to_owned());
    }
    let mut unknown = Vec::new();
    // Per action: call number -> its rules (`None`: every call, whatever the arguments).
    let mut by_action: Vec<(SeccompAction, Rules)> = Vec::new();
    let mut all = Rules::new();
    for (i, entry) in profile.syscalls().iter().flatten().enumerate() {
        let act = action(
            entry.action(),
            entry.errno_ret(),
            &format!("syscalls[{i}].action"),
        )?;
        // As runc: a rule of the default action is redundant (and must not become an
        // "allow" of the base filter).
        if act == default {
            continue;
        }
        let Some(conditions) = conditions(entry).map_err(|e| format!("syscalls[{i}]: {e}"))? else {
            // A condition libseccomp never matches: the rule never applies.
            warnings.push(format!(
                "linux.seccomp: syscalls[{i}] can never match (a masked value with bits outside its mask): left out"
            ));
            continue;
        };
        let rules = match by_action.iter().position(|(a, _)| *a == act) {
            Some(p) => &mut by_action[p].1,
            None => {
                by_action.push((act.clone(), Rules::new()));
                &mut by_action.last_mut().expect("just pushed").1
            }
        };
        for name in entry.names() {
            let Ok(call) = syscalls::Sysno::from_str(name) else {
                unknown.push(name.as_str());
                continue;
            };
            let call = i64::from(call.id());
            add(rules, call, &conditions);
            add(&mut all, call, &conditions);
        }
    }
    if !unknown.is_empty() {
        unknown.sort_unstable();
        unknown.dedup();
        let shown: Vec<&str> = unknown.iter().take(8).copied().collect();
        warnings.push(format!(
            "linux.seccomp: left out, not x86-64 system calls (32-bit or another \
             architecture's): {}{} ({} names)",
            shown.join(", "),
            if unknown.len() > shown.len() {
                ", ..."
            } else {
                ""
            },
            unknown.len()
        ));
    }
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(program(all, default.clone(), SeccompAction::Allow)?);
    }
    for (act, rules) in by_action {
        if act != SeccompAction::Allow && !rules.is_empty() {
            filters.push(program(rules, SeccompAction::Allow, act)?);
        }
    }
    // What the guest agent and the kernel take.
    if filters.len() > forkvm_agent_proto::MAX_SECCOMP_FILTERS {
        return Err(format!(
            "{} filters (one per distinct action and errno), at most {}",
            filters.len(),
            forkvm_agent_proto::MAX_SECCOMP_FILTERS
        ));
    }
    let instructions: usize = filters.iter().map(Vec::len).sum();
    if instructions > MAX_INSTRUCTIONS {
        return Err(format!(
            "{instructions} BPF instructions, at most {MAX_INSTRUCTIONS} (the kernel's limit)"
        ));
    }
    Ok(Compiled {
        filters: filters.iter().map(to_hex).collect(),
        warnings,
    })
}

/// Most instructions the kernel runs for one call over every stacked filter.
const MAX_INSTRUCTIONS: usize = 32_768;

type Rules = BTreeMap<i64, Option<Vec<SeccompRule>>>;

/// Adds `conditions` (rules any of which may hold; none: the call whatever its
/// arguments) for `call`.
fn add(rules: &mut Rules, call: i64, conditions: &[SeccompRule]) {
    let entry = rules.entry(call).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), conditions.is_empty()) {
        // An unconditional rule covers every other.
        (_, true) => *entry = None,
        (Some(list), false) => list.extend(conditions.iter().cloned()),
        (None, false) => {}
    }
}

fn program(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let rules = rules
        .into_iter()
        .map(|(call, rules)| (call, rules.unwrap_or_default()))
        .collect();
    SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| format!("cannot compile the profile: {e}"))
}

/// The highest errno a filter can return (`SECCOMP_RET_DATA` is 16 bits, the kernel
/// caps an errno at 4095).
const MAX_ERRNO: u32 = 4095;

/// The action for a profile's `action` and `errnoRet`.
fn action(a: LinuxSeccompAction, errno: Option<u32>, field: &str) -> Result<SeccompAction, String> {
    if let Some(e) = errno.filter(|&e| e > MAX_ERRNO) {
        return Err(format!("{field}: errnoRet {e} is above {MAX_ERRNO}"));
    }
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(DEFAULT_ERRNO)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(DEFAULT_ERRNO)),
        LinuxSeccompAction::ScmpActNotify => {
            return Err(format!(
                "{field}: SCMP_ACT_NOTIFY needs a listener on the host, which cannot reach the VM"
            ))
        }
    })
}

/// The rules of an entry's `args`, any of which may hold: one rule of all of them, or,
/// where an argument is named twice, one rule per condition (as runc builds them); an
/// empty list when it has none; `None` when it can never match.
fn conditions(entry: &LinuxSyscall) -> Result<Option<Vec<SeccompRule>>, String> {
    let Some(args) = entry.args().as_ref().filter(|a| !a.is_empty()) else {
        return Ok(Some(Vec::new()));
    };
    let mut list = Vec::with_capacity(args.len());
    for arg in args {
        let index = u8::try_from(arg.index())
            .ok()
            .filter(|i| *i < 6)
            .ok_or_else(|| format!("argument index {}: a call has 6", arg.index()))?;
        let (op, value) = match arg.op() {
            LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
            LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
            LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
            LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
            LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
            LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
            // libseccomp's: `(arg & value) == valueTwo`, never true when valueTwo has
            // bits outside the mask (seccompiler would mask valueTwo too).
            LinuxSeccompOperator::ScmpCmpMaskedEq => {
                let wanted = arg.value_two().unwrap_or(0);
                if wanted & !arg.value() != 0 {
                    return Ok(None);
                }
                (SeccompCmpOp::MaskedEq(arg.value()), wanted)
            }
        };
        list.push(
            SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                .map_err(|e| e.to_string())?,
        );
    }
    let mut indexes: Vec<usize> = args.iter().map(|a| a.index()).collect();
    indexes.sort_unstable();
    let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
    let rules = match repeated {
        true => list
            .into_iter()
            .map(|c| SeccompRule::new(vec![c]))
            .collect::<Result<Vec<_>, _>>(),
        false => SeccompRule::new(list).map(|r| vec![r]),
    };
    rules.map(Some).map_err(|e| e.to_string())
}

/// A program as the guest agent's protocol carries it: per instruction, `code` (4 hex
/// digits), `jt` (2), `jf` (2), `k` (8).
pub fn to_hex(program: &BpfProgram) -> String {
    program
        .iter()
        .map(|i| format!("{:04x}{:02x}{:02x}{:08x}", i.code, i.jt, i.jf, i.k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> LinuxSeccomp {
        serde_json::from_value(json).unwrap()
    }

    /// Runs `f` in a forked child under `compiled`'s programs (decoded from their hex
    /// form); the child's exit code.
    fn under(compiled: &Compiled, f: fn() -> i32) -> i32 {
        let programs: Vec<Vec<seccompiler::sock_filter>> = compiled
            .filters
            .iter()
            .map(|hex| {
                hex.as_bytes()
                    .chunks(16)
                    .map(|c| {
                        let c = std::str::from_utf8(c).unwrap();
                        let n = |r: std::ops::Range<usize>| u32::from_str_radix(&c[r], 16).unwrap();
                        seccompiler::sock_filter {
                            code: n(0..4) as u16,
                            jt: n(4..6) as u8,
                            jf: n(6..8) as u8,
                            k: n(8..16),
                        }
                    })
                    .collect()
            })
            .collect();
        // SAFETY: the child only installs the prepared programs, runs `f` (plain
        // system calls) and exits; the parent waits for it.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                for p in &programs {
                    if seccompiler::apply_filter(p).is_err() {
                        libc::_exit(99);
                    }
                }
                libc::_exit(f());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            }
        }
    }

    fn mkdir_errno() -> i32 {
        mkdir_mode(0o700)
    }

    fn mkdir_mode(mode: libc::mode_t) -> i32 {
        let dir = c"/proc/self/no-such-dir-for-the-test";
        // SAFETY: a NUL-terminated path.
        match unsafe { libc::mkdir(dir.as_ptr(), mode) } {
            0 => 0,
            _ => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        }
    }

    #[test]
    fn a_profile_runs_as_libseccomp_would_run_it() {
        // Allow by default, one call refused with its errno, one with the default EPERM.
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [
                {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                {"names": ["chroot"], "action": "SCMP_ACT_ERRNO"}
            ]
        })))
        .unwrap();
        assert_eq!(compiled.filters.len(), 2, "one filter per errno");
        assert_eq!(under(&compiled, mkdir_errno), 13);
        // SAFETY: chroot with a NUL-terminated path.
        let chroot = || unsafe {
            libc::chroot(c"/".as_ptr());
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        };
        assert_eq!(under(&compiled, chroot), libc::EPERM);

        // Docker's shape: refuse by default, allow a list (with an argument condition).
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "syscalls": [
                {"names": ["exit_group", "exit", "write", "fork", "wait4", "mmap", "munmap",
                           "rt_sigreturn", "futex", "sigaltstack", "rt_sigprocmask"],
                 "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 1, "value": 448, "op": "SCMP_CMP_EQ"}]}
            ]
        })))
        .unwrap();
        // mkdir with mode 0700 passes the filter (and fails in /proc); getpid is refused
        // with the default errno.
        assert_eq!(under(&compiled, mkdir_errno), libc::ENOENT);
        // SAFETY: getppid has no preconditions; the raw call shows the filter's answer.
        let getppid = || unsafe {
            match libc::syscall(libc::SYS_getppid) {
                -1 => std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                _ => 0,
            }
        };
        assert_eq!(under(&compiled, getppid), 38);

        // A rule of the default action is redundant, as runc treats it: getppid stays
        // refused (it must not become an "allow" of the base filter).
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["exit_group", "exit"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}
            ]
        })))
        .unwrap();
        assert_eq!(under(&compiled, getppid), libc::EPERM);

        // An argument named twice: either condition lets the call through (runc's
        // rules), here mkdir with mode 0700 or 0750, not 0755.
        let compiled = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 38,
            "syscalls": [
                {"names": ["exit_group", "exit"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["mkdir"], "action": "SCMP_ACT_ALLOW", "args": [
                    {"index": 1, "value": 448, "op": "SCMP_CMP_EQ"},
                    {"index": 1, "value": 488, "op": "SCMP_CMP_EQ"}]}
            ]
        })))
        .unwrap();
        assert_eq!(under(&compiled, mkdir_errno), libc::ENOENT);
        assert_eq!(under(&compiled, || mkdir_mode(0o750)), libc::ENOENT);
        assert_eq!(under(&compiled, || mkdir_mode(0o755)), 38);
    }

    #[test]
    fn what_cannot_be_honoured_is_named_and_unknown_names_are_left_out() {
        let e = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]
        })))
        .unwrap_err();
        assert!(e.starts_with("syscalls[0].action: SCMP_ACT_NOTIFY"), "{e}");
        let e = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]
        })))
        .unwrap_err();
        assert!(e.contains("argument index 6"), "{e}");
        let c = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["socketcall", "mkdir", "chown32"], "action": "SCMP_ACT_ERRNO"}]
        })))
        .unwrap();
        assert_eq!(
            c.warnings,
            [
                "linux.seccomp: left out, not x86-64 system calls (32-bit or another \
                 architecture's): chown32, socketcall (2 names)"
            ]
        );
        let e = compile(&profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 65536}]
        })))
        .unwrap_err();
        assert!(e.contains("errnoRet 65536 is above 4095"), "{e}");
        assert_eq!(c.filters.len(), 1);
        // Nothing but the default allowing: no filter at all.
        let c = compile(&profile(
            serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW"}),
        ))
        .unwrap();
        assert!(c.filters.is_empty());
    }
}
