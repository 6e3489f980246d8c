//! The container's seccomp filters ([`forkvm_agent_proto::Request::Container`]'s
//! `seccomp`, compiled by the host from the OCI `linux.seccomp`): decoded once, kept
//! by the container ([`crate::containers::Container::set_seccomp`]), and installed by
//! [`crate::spawn`] on every process it starts in that container from then on (its hooks aside), as runc installs them: after
//! `no_new_privs` when the process asks for it, else before its user and capabilities
//! change (while it may still install a filter).

use forkvm_agent_proto::MAX_SECCOMP_FILTERS;

/// Most instructions one program may have (the kernel's `BPF_MAXINSNS`).
const MAX_INSTRUCTIONS: usize = 4096;

/// Decodes `programs` (at most [`MAX_SECCOMP_FILTERS`]), in order.
pub fn decode_all(programs: &[String]) -> Result<Vec<Vec<libc::sock_filter>>, String> {
    if programs.len() > MAX_SECCOMP_FILTERS {
        return Err(format!(
            "{} filters, at most {MAX_SECCOMP_FILTERS}",
            programs.len()
        ));
    }
    programs
        .iter()
        .enumerate()
        .map(|(i, p)| decode(p).map_err(|e| format!("filter {i}: {e}")))
        .collect()
}

/// One program from its hex form: 16 digits per instruction (code, jt, jf, k).
pub fn decode(hex: &str) -> Result<Vec<libc::sock_filter>, String> {
    if !hex.is_ascii() {
        return Err("not ASCII hex".into());
    }
    if hex.is_empty() || !hex.len().is_multiple_of(16) {
        return Err(format!(
            "{} hex digits: not a whole number of instructions",
            hex.len()
        ));
    }
    if hex.len() / 16 > MAX_INSTRUCTIONS {
        return Err(format!(
            "{} instructions, at most {MAX_INSTRUCTIONS}",
            hex.len() / 16
        ));
    }
    let field = |s: &str| u32::from_str_radix(s, 16).map_err(|_| format!("{s:?} is not hex"));
    hex.as_bytes()
        .chunks(16)
        .map(|c| {
            let c = std::str::from_utf8(c).map_err(|_| "not ASCII".to_owned())?;
            Ok(libc::sock_filter {
                code: field(&c[0..4])? as u16,
                jt: field(&c[4..6])? as u8,
                jf: field(&c[6..8])? as u8,
                k: field(&c[8..16])?,
            })
        })
        .collect()
}

/// Installs `programs` on the calling thread (and its future children); `Err(errno)`.
///
/// # Safety
///
/// Async-signal-safe: for the child of a fork in a multi-threaded process; `programs`
/// must stay alive across the call.
pub unsafe fn install(programs: &[libc::sock_fprog]) -> Result<(), i32> {
    for prog in programs {
        // SAFETY: `prog` points at a whole program that outlives the call; the kernel
        // copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
    }
    Ok(())
}

/// The `sock_fprog`s of `programs`, for [`install`].
pub fn fprogs(programs: &[Vec<libc::sock_filter>]) -> Vec<libc::sock_fprog> {
    programs
        .iter()
        .map(|p| libc::sock_fprog {
            len: p.len() as u16,
            filter: p.as_ptr().cast_mut(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_decode_from_hex_and_bad_ones_are_refused() {
        // RET ALLOW.
        let p = decode("0006000000000000000600007fff0000").unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[1].code, p[1].jt, p[1].jf, p[1].k),
            (6, 0, 0, 0x7fff_0000)
        );
        for (bad, wanted) in [
            ("", "not a whole number"),
            ("0006", "not a whole number"),
            ("000600000000000g", "not hex"),
            ("000é00000000000", "not ASCII"),
        ] {
            let e = decode(bad).unwrap_err();
            assert!(e.contains(wanted), "{bad}: {e}");
        }
        let huge = "0006000000000000".repeat(MAX_INSTRUCTIONS + 1);
        assert!(decode(&huge).unwrap_err().contains("at most 4096"));
    }
}
