use super::*;

const SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00000000 00:1f 1234                       /usr/bin/forkvm
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
Private_Clean:       100 kB
Private_Dirty:         0 kB
7f0000000000-7f0010000000 rw-p 00000000 00:01 5678                       /memfd:forkvm-guest-ram (deleted)
Size:             262144 kB
KernelPageSize:        4 kB
Rss:               20480 kB
Pss:                1000 kB
Shared_Clean:          0 kB
Shared_Dirty:      20000 kB
Private_Clean:        12 kB
Private_Dirty:       468 kB
Referenced:        20480 kB
Anonymous:           300 kB
VmFlags: rd wr mr mw me ac sd
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                2048 kB
Private_Clean:         0 kB
Private_Dirty:      2048 kB
Anonymous:          2048 kB
7f0020000000-7f0020100000 rw-p 00000000 00:01 5679                       /memfd:forkvm-guest-ram-overlay (deleted)
Size:               1024 kB
Rss:                  64 kB
Private_Clean:         4 kB
Private_Dirty:        16 kB
Anonymous:             8 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  16 kB
Private_Dirty:        16 kB
";

const ROLLUP: &str = "\
55d0c0a00000-7ffd00021000 ---p 00000000 00:00 0                          [rollup]
Rss:               23000 kB
Pss:                3500 kB
Pss_Anon:           2100 kB
Shared_Clean:        800 kB
Shared_Dirty:      20000 kB
Private_Clean:       116 kB
Private_Dirty:      2548 kB
Referenced:        23000 kB
Anonymous:          2400 kB
Private_Hugetlb:       0 kB
";

#[test]
fn smaps_sums_only_the_guest_ram_mappings() {
    let m = parse_smaps(SMAPS);
    assert_eq!(m.mappings, 2);
    assert_eq!(m.private_kib, 12 + 468 + 4 + 16);
    assert_eq!(m.private_dirty_kib, 468 + 16);
    // The copies: the anonymous stack mapping is not guest RAM.
    assert_eq!(m.anon_kib, 300 + 8);
    assert_eq!(m.rss_kib, 20480 + 64);
    assert_eq!(parse_smaps(""), GuestRamMem::default());
    assert_eq!(parse_smaps("garbage\nPrivate_Dirty: 5 kB\n").private_kib, 0);
}

#[test]
fn smaps_headers_are_recognised() {
    assert_eq!(
        mapping_header("7f00-7f10 rw-p 00000000 00:01 5678   /memfd:forkvm-guest-ram (deleted)"),
        Some("/memfd:forkvm-guest-ram (deleted)")
    );
    assert_eq!(mapping_header("7f00-7f10 rw-p 00000000 00:00 0 "), Some(""));
    assert_eq!(mapping_header("Private_Dirty:  1 kB"), None);
    assert_eq!(mapping_header("VmFlags: rd wr"), None);
}

#[test]
fn rollup_private_and_pss() {
    let r = parse_rollup(ROLLUP);
    assert_eq!(r.rss_kib, 23000);
    assert_eq!(r.pss_kib, 3500, "Pss_Anon must not be added");
    assert_eq!(r.private_kib, 116 + 2548);
    assert_eq!(r.anon_kib, 2400);
    assert_eq!(r.private_dirty_kib, 2548);
}

fn child(t1: u64, t2: Option<u64>, guest: u64) -> ChildSample {
    ChildSample {
        pid: 1,
        t1_us: t1,
        warm: t1 < 2000,
        t2_us: t2,
        mem: Some(MemSample {
            guest_ram: GuestRamMem {
                anon_kib: guest,
                private_kib: guest * 3,
                private_dirty_kib: guest * 2,
                ..GuestRamMem::default()
            },
            // 1000 KiB of the process's own outside guest RAM, and 5000 KiB anonymous
            // it shares with its zygote.
            process: Rollup {
                rss_kib: 0,
                pss_kib: guest * 2,
                private_kib: guest * 3 + 1000,
                anon_kib: guest + 6000,
                private_dirty_kib: guest * 2 + 1000,
            },
        }),
        page_types: None,
        steps: Vec::new(),
    }
}

fn rounds() -> Vec<ForkRound> {
    let round = |count, round, pause, children| ForkRound {
        jailed: true,
        pool: 2,
        count,
        round,
        parent_pause_us: pause,
        call_us: 0,
        parent_mem: None,
        children,
    };
    vec![
        round(1, 0, 300, vec![child(1000, Some(3000), 100)]),
        round(1, 1, 500, vec![child(3000, Some(5000), 300)]),
        round(
            2,
            0,
            700,
            vec![child(2000, Some(4000), 200), child(4000, None, 400)],
        ),
    ]
}

#[test]
fn aggregation_per_count() {
    let s = summarise(&rounds());
    assert_eq!(s.len(), 2);
    let one = &s[0];
    assert_eq!((one.count, one.forks), (1, 2));
    let t1 = one.t1_ms.unwrap();
    assert_eq!((t1.n, t1.p50, t1.min, t1.max), (2, 2.0, 1.0, 3.0));
    assert!((t1.p99 - 2.98).abs() < 1e-9, "{t1:?}");
    assert_eq!(one.pause_us.unwrap().max, 500.0);
    assert_eq!(one.guest_own_kib.unwrap().p50, 200.0);
    assert_eq!(one.process_own_kib.unwrap().p50, 1200.0);
    assert_eq!(one.warm, 1);
    assert_eq!(one.last_t1_ms.unwrap().p50, 2.0);
    let two = &s[1];
    assert_eq!((two.count, two.forks, two.t2_missing), (2, 1, 1));
    assert_eq!(two.warm, 0);
    assert_eq!(two.last_t1_ms.unwrap().max, 4.0);
    assert_eq!(two.t1_ms.unwrap().n, 2);
    assert_eq!(two.t2_ms.unwrap().n, 1);
    assert_eq!(two.t2_ms.unwrap().p50, 4.0);
    assert_eq!(two.pss_kib.unwrap().max, 800.0);
}

#[test]
fn cold_summary_and_ratios() {
    let cold = vec![
        ColdSample {
            run: 0,
            pid: 9,
            ready_us: Some(100_000),
            agent_us: Some(200_000),
            mem: child(0, None, 20_000).mem,
        },
        ColdSample {
            run: 1,
            pid: 10,
            ready_us: None,
            agent_us: Some(400_000),
            mem: None,
        },
    ];
    let c = summarise_cold(&cold).unwrap();
    assert_eq!(c.boots, 2);
    assert_eq!(c.ready_ms.unwrap().n, 1);
    assert_eq!(c.agent_ms.unwrap().p50, 300.0);
    let v = versus(&summarise(&rounds()), &c);
    assert!((v[0].t1_vs_ready - 2.0 / 100.0).abs() < 1e-12);
    assert!((v[0].t2_vs_agent - 4.0 / 300.0).abs() < 1e-12);
    // A cold VM's own guest RAM is all it maps of its memory file (Private_*: 3 x
    // 20000 in this sample), not its Anonymous memory (none in a real one).
    assert_eq!(c.guest_own_kib.unwrap().p50, 60_000.0);
    assert_eq!(c.process_own_kib.unwrap().p50, 60_000.0 + 1000.0);
    assert!((v[0].guest_own - 200.0 / 60_000.0).abs() < 1e-12);
    assert!(summarise_cold(&[]).is_none());
    let t = table(&summarise(&rounds()), Some(&c), &v);
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("series"), "{t}");
    assert!(
        lines[2].starts_with("fork x1, pool 2, jailed (2 forks)"),
        "{t}"
    );
    assert!(lines[3].contains("(1 no answer)"), "{t}");
    assert!(lines[4].starts_with("cold boot"), "{t}");
    assert!(lines[5].contains("0.02x"), "{t}");
    let len = lines[0].len();
    assert!(lines[2..5].iter().all(|l| l.len() == len), "{t}");
}

#[test]
fn pool_sizes_are_separate_series() {
    let mut r = rounds();
    let mut off = r[0].clone();
    off.pool = 0;
    off.children = vec![child(9000, Some(9500), 100)];
    r.push(off);
    let s = summarise(&r);
    assert_eq!(
        s.iter()
            .map(|s| (s.pool, s.count, s.forks))
            .collect::<Vec<_>>(),
        vec![(2, 1, 2), (2, 2, 1), (0, 1, 1)]
    );
    assert_eq!(s[2].t1_ms.unwrap().p50, 9.0);
}

#[test]
fn jailed_and_unjailed_forks_are_separate_series() {
    let mut r = rounds();
    let mut free = r[0].clone();
    free.jailed = false;
    free.children = vec![child(900, Some(950), 100)];
    r.push(free);
    let s = summarise(&r);
    assert_eq!(
        s.iter()
            .map(|s| (s.jailed, s.pool, s.count, s.forks))
            .collect::<Vec<_>>(),
        vec![(true, 2, 1, 2), (true, 2, 2, 1), (false, 2, 1, 1)]
    );
    let t = table(&s, None, &[]);
    assert!(t.contains("fork x1, pool 2, jailed (2 forks)"), "{t}");
    assert!(t.contains("fork x1, pool 2, no jail (1 forks)"), "{t}");
}

#[test]
fn a_childs_start_steps_are_read_from_its_log_and_tabled_per_series() {
    let log = "2026-12-06T07:00:00Z  INFO forkvm_vmm: something else\n\
               2026-12-06T07:00:01Z  INFO forkvm_vm_process: fork child running after \
               register 812 us, console 40 us, jail 3 us, map memory 21500 us, \
               extents mapped 250, report 900 us warm=true\n";
    let steps = parse_steps(log);
    assert_eq!(
        steps,
        [
            ("register", 812),
            ("console", 40),
            ("jail", 3),
            ("map memory", 21500),
            ("extents mapped (count)", 250),
            ("report", 900)
        ]
        .map(|(n, us)| (n.to_owned(), us))
    );
    assert!(parse_steps("no such line\n").is_empty());
    assert_eq!(steps_table(&rounds()), None, "no child logged its steps");
    let mut rounds = rounds();
    for (i, c) in rounds[0].children.iter_mut().enumerate() {
        c.steps = vec![
            ("register".into(), 1000 * (i as u64 + 1)),
            ("map memory".into(), 20_000),
            (format!("extents mapped{COUNT}"), 250),
        ];
    }
    let table = steps_table(&rounds).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("fork x{}", rounds[0].count)))
        .unwrap();
    assert!(table.contains("register p50 / max ms"), "{table}");
    assert!(
        table.contains("extents mapped p50 / max")
            && !table.contains("extents mapped p50 / max ms"),
        "{table}"
    );
    assert!(row.contains("20.0 / 20.0"), "{table}");
    assert!(row.contains("250 / 250"), "{table}");
}

#[test]
fn fewer_rounds_for_many_children() {
    assert_eq!(rounds_for(1, 5), 5);
    assert_eq!(rounds_for(10, 5), 5);
    assert_eq!(rounds_for(20, 5), 3);
    assert_eq!(rounds_for(50, 5), 1);
    assert_eq!(rounds_for(100, 5), 1);
    assert_eq!(rounds_for(100, 30), 3);
    assert_eq!(rounds_for(0, 2), 2);
}

#[test]
fn distributions() {
    let d = Dist::of(&[5.0, 1.0, 3.0]).unwrap();
    assert_eq!((d.n, d.p50, d.min, d.max), (3, 3.0, 1.0, 5.0));
    assert!((d.p99 - 4.96).abs() < 1e-9);
    assert!(Dist::of(&[]).is_none());
}

#[test]
fn the_plot_has_a_line_per_pool_and_measure() {
    let c = summarise_cold(&[ColdSample {
        run: 0,
        pid: 9,
        ready_us: Some(100_000),
        agent_us: Some(200_000),
        mem: None,
    }]);
    let svg = plot::svg(&summarise(&rounds()), c.as_ref()).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    for label in [
        "T1: fork request -&gt; child running",
        "pool 2: T1 p50",
        "pool 2: last child&apos;s T1 p50",
        "pool 2: T2 p50",
        "one cold boot",
        "children per fork",
    ] {
        assert!(svg.contains(label), "no {label:?} in the plot");
    }
    // Nothing measured still draws the axes.
    assert!(plot::svg(&[], None).unwrap().contains("children per fork"));
}
