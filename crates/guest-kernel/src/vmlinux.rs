//! The uncompressed kernel: the ELF `vmlinux` a bzImage carries compressed, extracted
//! once into the cache beside the package's `vmlinuz`.
//!
//! A bzImage boots by running its own decompressor inside the guest, before the guest's
//! clock starts: under nested virtualization that is most of what a cold boot spends
//! before the kernel proper (Firecracker boots an ELF `vmlinux` for the same reason).
//! The default guests therefore boot the ELF; user kernels may be either.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{Error, KernelTree};

/// Largest uncompressed kernel accepted (Debian's is about 60 MiB).
pub const MAX_VMLINUX: u64 = 512 << 20;

/// Why a bzImage's kernel could not be extracted.
#[derive(Debug, thiserror::Error)]
pub enum VmlinuxError {
    /// Not a bzImage, or its header points outside the file.
    #[error("not a bzImage: {0}")]
    NotBzImage(&'static str),
    /// Compressed with a method this extractor does not decode.
    #[error("the kernel payload is compressed with an unsupported method (magic {0})")]
    Unsupported(String),
    /// Decompression failed.
    #[error("cannot decompress the kernel payload")]
    Decompress(#[source] std::io::Error),
    /// The result is too large or not an x86-64 ELF.
    #[error("the decompressed kernel {0}")]
    BadElf(String),
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage (boot protocol 2.08 or later).
fn payload(image: &[u8]) -> Result<&[u8], VmlinuxError> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(VmlinuxError::NotBzImage("no HdrS setup header"));
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x208 {
        return Err(VmlinuxError::NotBzImage(
            "boot protocol before 2.08 has no payload fields",
        ));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let offset = u32_at(image, 0x248).ok_or(VmlinuxError::NotBzImage("truncated header"))?;
    let len = u32_at(image, 0x24c).ok_or(VmlinuxError::NotBzImage("truncated header"))?;
    let from = start
        .checked_add(offset as usize)
        .ok_or(VmlinuxError::NotBzImage("payload offset overflows"))?;
    let to = from
        .checked_add(len as usize)
        .ok_or(VmlinuxError::NotBzImage("payload length overflows"))?;
    image
        .get(from..to)
        .ok_or(VmlinuxError::NotBzImage("payload outside the file"))
}

const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// The LZ4 legacy frame (`lz4 -l`, what the kernel build writes).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Uncompressed size of every block of an LZ4 legacy frame but the last.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decodes an LZ4 legacy frame (magic, then blocks of a 32-bit compressed size and an
/// LZ4 block of at most 8 MiB; the kernel build appends the 32-bit uncompressed size).
fn unlz4_legacy(data: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut rest = &data[4..];
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while rest.len() >= 4 {
        let size = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        rest = &rest[4..];
        if size == LZ4_LEGACY_MAGIC {
            continue; // concatenated frames
        }
        if rest.is_empty() {
            break; // the appended uncompressed size
        }
        let compressed = rest
            .get(..size as usize)
            .ok_or_else(|| bad("an LZ4 block runs past the end of the payload"))?;
        let n = lz4_flex::block::decompress_into(compressed, &mut block)
            .map_err(|e| bad(&format!("LZ4 block: {e}")))?;
        if (out.len() + n) as u64 > MAX_VMLINUX {
            return Err(bad("larger than the limit"));
        }
        out.extend_from_slice(&block[..n]);
        rest = &rest[size as usize..];
    }
    Ok(out.len())
}

/// Extracts the ELF kernel from a bzImage compressed with LZ4 (Debian's cloud kernel),
/// xz (the kernel's x86 BCJ + LZMA2 stream, Debian's generic kernel) or gzip.
pub fn extract(image: &[u8]) -> Result<Vec<u8>, VmlinuxError> {
    let data = payload(image)?;
    // Never more than the limit, however the stream claims to expand.
    let mut out = Vec::new();
    let read = if data.starts_with(XZ_MAGIC) {
        // The build appends the uncompressed size after the stream: one stream only.
        lzma_rust2::XzReader::new(data, false)
            .take(MAX_VMLINUX + 1)
            .read_to_end(&mut out)
    } else if data.starts_with(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
        unlz4_legacy(data, &mut out)
    } else if data.starts_with(GZIP_MAGIC) {
        flate2::read::GzDecoder::new(data)
            .take(MAX_VMLINUX + 1)
            .read_to_end(&mut out)
    } else {
        let magic: String = data.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(VmlinuxError::Unsupported(magic));
    };
    read.map_err(VmlinuxError::Decompress)?;
    if out.len() as u64 > MAX_VMLINUX {
        return Err(VmlinuxError::BadElf(format!(
            "is larger than {MAX_VMLINUX} bytes"
        )));
    }
    check_elf(&out)?;
    Ok(out)
}

/// Checks that `elf` starts as a 64-bit little-endian x86-64 ELF executable.
fn check_elf(elf: &[u8]) -> Result<(), VmlinuxError> {
    let ok = elf.len() > 64
        && elf[..4] == *b"\x7fELF"
        && elf[4] == 2 // ELFCLASS64
        && elf[5] == 1 // little-endian
        && u16::from_le_bytes([elf[18], elf[19]]) == 62; // EM_X86_64
    if ok {
        Ok(())
    } else {
        Err(VmlinuxError::BadElf("is not an x86-64 ELF".into()))
    }
}

/// The ELF kernel of `tree`, extracted into `boot/vmlinux-<version>` on first use (an
/// interrupted extraction leaves nothing behind: the file appears complete or not at
/// all).
pub fn cached_vmlinux(tree: &KernelTree) -> Result<PathBuf, Error> {
    let path = tree
        .root
        .join("boot")
        .join(format!("vmlinux-{}", tree.version));
    if is_elf_file(&path) {
        return Ok(path);
    }
    let src = tree.vmlinuz();
    let image = std::fs::read(&src).map_err(|source| Error::Io {
        path: src.clone(),
        source,
    })?;
    let elf = extract(&image).map_err(|e| Error::Vmlinux {
        path: src.clone(),
        source: e,
    })?;
    crate::kernel::write_cache_file(&path, &elf)?;
    tracing::info!(path = %path.display(), bytes = elf.len(), "extracted the uncompressed kernel");
    Ok(path)
}

fn is_elf_file(path: &Path) -> bool {
    let mut head = [0u8; 64 + 1];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && check_elf(&head).is_ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A minimal x86-64 ELF header followed by filler.
    fn fake_elf() -> Vec<u8> {
        let mut e = vec![0u8; 4096];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[18] = 62;
        for (i, b) in e[64..].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        e
    }

    /// A bzImage-shaped file: setup sectors, then `payload` where the header says.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let start = (usize::from(setup_sects) + 1) * 512;
        let offset = 0x40usize;
        let mut img = vec![0u8; start + offset];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        // The kernel build appends the uncompressed size.
        img.extend_from_slice(&4096u32.to_le_bytes());
        img
    }

    fn xz_x86(data: &[u8]) -> Vec<u8> {
        let mut opts = lzma_rust2::XzOptions::with_preset(6);
        opts.filters.push(lzma_rust2::FilterConfig::new_bcj_x86(0));
        let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn extracts_an_xz_bcj_kernel() {
        let elf = fake_elf();
        assert_eq!(extract(&bzimage(&xz_x86(&elf))).unwrap(), elf);
    }

    #[test]
    fn extracts_an_lz4_legacy_kernel() {
        // Larger than one legacy block, so the frame has two.
        let elf: Vec<u8> = fake_elf()
            .into_iter()
            .cycle()
            .take(LZ4_LEGACY_BLOCK + 10_000)
            .collect();
        let mut frame = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in elf.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            frame.extend_from_slice(&(block.len() as u32).to_le_bytes());
            frame.extend_from_slice(&block);
        }
        assert_eq!(extract(&bzimage(&frame)).unwrap(), elf);
        // A block that claims more bytes than there are.
        let mut cut = frame.clone();
        cut.truncate(frame.len() - 100);
        assert!(matches!(
            extract(&bzimage(&cut)),
            Err(VmlinuxError::Decompress(_))
        ));
    }

    #[test]
    fn extracts_a_gzip_kernel() {
        let elf = fake_elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        assert_eq!(extract(&bzimage(&gz.finish().unwrap())).unwrap(), elf);
    }

    #[test]
    fn refuses_what_is_not_a_compressed_elf_kernel() {
        assert!(matches!(extract(b"MZ"), Err(VmlinuxError::NotBzImage(_))));
        let mut img = bzimage(b"BZh91AY&SY");
        assert!(
            matches!(extract(&img), Err(VmlinuxError::Unsupported(m)) if m.starts_with("425a68"))
        );
        // A payload length past the end of the file.
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(extract(&img), Err(VmlinuxError::NotBzImage(_))));
        // A compressed stream that is not an ELF.
        let not_elf = xz_x86(&[0u8; 4096]);
        assert!(matches!(
            extract(&bzimage(&not_elf)),
            Err(VmlinuxError::BadElf(_))
        ));
        // A corrupt stream.
        let mut bad = xz_x86(&fake_elf());
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        assert!(extract(&bzimage(&bad)).is_err());
    }

    #[test]
    fn the_cache_keeps_one_extracted_copy() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        let tree = KernelTree {
            package: "linux-image-9.9.9-cloud-amd64".into(),
            version: "9.9.9-cloud-amd64".into(),
            root: dir.path().to_owned(),
        };
        std::fs::write(tree.vmlinuz(), bzimage(&xz_x86(&fake_elf()))).unwrap();
        let path = cached_vmlinux(&tree).unwrap();
        assert_eq!(path, boot.join("vmlinux-9.9.9-cloud-amd64"));
        assert_eq!(std::fs::read(&path).unwrap(), fake_elf());
        // Not extracted again: a later call returns the file as it is.
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::remove_file(tree.vmlinuz()).unwrap();
        assert_eq!(cached_vmlinux(&tree).unwrap(), path);
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        // A truncated file is replaced.
        std::fs::write(&path, b"\x7fELF").unwrap();
        assert!(
            cached_vmlinux(&tree).is_err(),
            "re-extracted without a vmlinuz"
        );
    }
}
