//! `forkvm images`, `rmi`, `pull` and `load`: the image store's verbs (the store itself
//! is `forkvm_image::Store`, at `$FORKVM_STORE` or its default place).

use anyhow::{Context, Result};
use forkvm_image::{Image, PullOptions, Store, TermProgress};

use crate::cli::{ImagesArgs, LoadArgs, PsFormat, PullArgs, RmiArgs};

/// Opens the store every image verb works on.
pub fn open_store() -> Result<Store> {
    let root = Store::default_root();
    Store::open(&root).with_context(|| format!("cannot open the image store {}", root.display()))
}

/// `sha256:abcdef...` as the 12-hex-digit short ID.
fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// Bytes as a short human size (`5.2MB`, like podman).
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
            + UNITS[unit]
    }
}

/// `repo:tag` split at the tag's colon (a registry port's colon stays in the repo).
fn repo_and_tag(name: &str) -> (&str, &str) {
    match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], &name[i + 1..]),
        _ => (name, "<none>"),
    }
}

/// The rows of `forkvm images`: one per name, `<none>` for an image without one.
fn rows(images: &[Image], no_trunc: bool) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    for img in images {
        let id = if no_trunc {
            img.id.clone()
        } else {
            short_id(&img.id).to_owned()
        };
        let size = human_size(img.size);
        if img.names.is_empty() {
            rows.push(["<none>".into(), "<none>".into(), id.clone(), size.clone()]);
        }
        for n in &img.names {
            let (repo, tag) = repo_and_tag(n);
            rows.push([repo.into(), tag.into(), id.clone(), size.clone()]);
        }
    }
    rows
}

/// `forkvm images`.
pub fn list(args: ImagesArgs) -> Result<i32> {
    let store = open_store()?;
    let images = store.list().context("cannot list the images")?;
    if args.format == PsFormat::Json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(0);
    }
    if args.quiet {
        for img in &images {
            println!(
                "{}",
                if args.no_trunc {
                    &img.id
                } else {
                    short_id(&img.id)
                }
            );
        }
        return Ok(0);
    }
    let mut table = vec![[
        "REPOSITORY".to_owned(),
        "TAG".to_owned(),
        "IMAGE ID".to_owned(),
        "SIZE".to_owned(),
    ]];
    table.extend(rows(&images, args.no_trunc));
    let widths: Vec<usize> = (0..4)
        .map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in &table {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(0)
}

/// `forkvm rmi`: removes each image; reports every failure, exits 1 if any.
pub fn remove(args: RmiArgs) -> Result<i32> {
    let store = open_store()?;
    let mut code = 0;
    for name in &args.images {
        match store.remove(name) {
            Ok(removed) => {
                for n in &removed.untagged {
                    println!("Untagged: {n}");
                }
                if let Some(id) = &removed.deleted {
                    println!("Deleted: {id}");
                }
            }
            Err(e) => {
                eprintln!("forkvm: rmi {name}: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// `forkvm pull`.
pub fn pull(args: PullArgs) -> Result<i32> {
    let store = open_store()?;
    let opts = PullOptions {
        plain_http: args.plain_http,
        ..Default::default()
    };
    let progress = TermProgress::new();
    let img = store
        .pull(&args.reference, &opts, &progress)
        .with_context(|| format!("cannot pull {}", args.reference))?;
    if args.quiet {
        println!("{}", img.id);
    } else {
        println!("{} {}", img.id, img.names.join(" "));
    }
    Ok(0)
}

/// `forkvm load`.
pub fn load(args: LoadArgs) -> Result<i32> {
    let store = open_store()?;
    let progress = TermProgress::new();
    let images = store
        .load(&args.input, args.tag.as_deref(), &progress)
        .with_context(|| format!("cannot load {}", args.input.display()))?;
    for img in &images {
        if args.quiet {
            println!("{}", img.id);
        } else if img.names.is_empty() {
            println!("Loaded image: {}", img.id);
        } else {
            for n in &img.names {
                println!("Loaded image: {n}");
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_podman() {
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1_234_567), "1.235MB");
        assert_eq!(human_size(5_000_000), "5MB");
        assert_eq!(human_size(2_500_000_000), "2.5GB");
    }

    #[test]
    fn names_split_at_the_tag_not_the_port() {
        assert_eq!(
            repo_and_tag("localhost/busybox:latest"),
            ("localhost/busybox", "latest")
        );
        assert_eq!(
            repo_and_tag("127.0.0.1:5000/img:1"),
            ("127.0.0.1:5000/img", "1")
        );
        assert_eq!(
            repo_and_tag("127.0.0.1:5000/img"),
            ("127.0.0.1:5000/img", "<none>")
        );
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
    }
}
