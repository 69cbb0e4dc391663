//! snapstore against restic, borg, rustic and casync on the same checkpoint sequences, in the same run.
//!
//! Run: `cargo bench --bench peers` (flags after `--`):
//! - `--install`: `apt-get install -y restic borgbackup casync` and `cargo install --locked rustic-rs b3sum`
//!   first. Without it, a tool that is not on PATH (or in ~/.cargo/bin) is skipped, with a message.
//! - `--quick`: an eighth of the data, for a smoke run.
//! - `--workload vm,ml,sim,src` and `--tools snapstore,restic,rustic,borg,casync`: run only these.
//! - `--write-docs`: replace the generated part of docs/benchmarks.md (between `<!-- peers:begin -->` and
//!   `<!-- peers:end -->`) with this run's tables, command, machine and date.
//!
//! - `--keep`: keep the last version of each workload, every tool's repository and checkouts (for profiling
//!   one tool on the same data); the directory is printed at the end.
//!
//! Data goes to `SNAPSTORE_BENCH_DIR` or the system temp directory (about 7 GiB for a full run), and is
//! removed at the end of the run, except the checkouts of the workloads of few files, removed when their
//! workload is done to give their page cache back (see `run_workload`). The run's header names the filesystem
//! the data is on; on an ext4 without a journal the run warns first that mass deletions there in the minutes
//! before slow the checkouts of many files.
//! `SNAPSTORE_BENCH_INIT="--chunk-size 32"` passes options to `snapstore init`, for parameter sweeps.
//!
//! Four workloads, generated from fixed seeds, five versions each; every version is made by changing the
//! previous one where it lives, as the real writer would, and every tool commits it before the next is made:
//! - `vm`: an ext4 image (`mke2fs -d` of a generated root: binaries, docs, logs, photos, a database) that a
//!   "guest" then changes with `debugfs -w` (files added, rewritten, deleted) while 3 % of the database's
//!   pages are overwritten in place at the blocks `debugfs` reports for it.
//! - `ml`: two safetensors shards of float32 tensors (a small transformer), rewritten whole at each save as a
//!   trainer does; fine-tuning moves some layers and not others, and one version moves every weight slightly.
//! - `sim`: one restart file of eight f64 fields, replaced at each step: static mesh fields, a front sweeping
//!   the domain and a few local hot spots.
//! - `src`: a tree of thousands of small source files; each release edits 3 %, adds 1 % and deletes 0.5 %.
//!
//! Each tool command runs as a child under `/usr/bin/time -f "%M %O"`: peak RSS, and blocks written (pages
//! it dirtied, so page-cache writes count; `sync` runs before each command so that none are dirty already).
//! Wall time is measured here. The data is in the page cache, as a
//! just-written checkpoint is; nothing drops caches (that would need root and is not what a checkpoint sees).
//! Checkout is of the last version into an empty directory, three times with the tools taking turns, and the
//! best time counts; rollback then takes the last checkout back to the
//! version before, in place (snapstore `--in-place --delete`, rustic `restore --delete` over it, restic and
//! casync restoring over it). Each cell shows the bytes written; a tool that writes every file again anyway
//! (restic 0.14, casync 2: see `Tool::patches_in_place`) gets "—" and its figures in brackets; borg has no
//! such mode. Every checkout and rollback is compared with the version it should be (the set of paths and
//! the BLAKE3 of every file); a mismatch is printed loudly and marked in the table.
//! Peer settings are the fastest sensible ones; see `Tool::settings`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const VERSIONS: usize = 5;
const DOCS_PATH: &str = "docs/benchmarks.md";
const DOCS_BEGIN: &str = "<!-- peers:begin -->";
const DOCS_END: &str = "<!-- peers:end -->";
const DOCS_HEADING: &str = "## Against restic, borg, rustic and casync (issue 5)";
const RESTIC_PASSWORD: &str = "snapstore-bench";

struct Rng(u64);

impl Rng {
    // SplitMix64: every seed, even 0, gives a full-period, well-mixed stream.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
    /// About N(0, 1): the sum of four 16-bit uniforms, one draw per value (weights need speed, not tails).
    fn normal(&mut self) -> f32 {
        let r = self.next();
        let s = (r & 0xffff) + (r >> 16 & 0xffff) + (r >> 32 & 0xffff) + (r >> 48);
        (s as f32 - 131_070.0) / 37_837.0
    }
}

const WORDS: &[&str] = &[
    "fn",
    "let",
    "mut",
    "self",
    "return",
    "if",
    "else",
    "match",
    "struct",
    "impl",
    "pub",
    "use",
    "for",
    "in",
    "while",
    "config",
    "value",
    "error",
    "result",
    "buffer",
    "index",
    "count",
    "offset",
    "length",
    "node",
    "tree",
    "parse",
    "write",
    "read",
    "state",
    "=",
    "+",
    "->",
    "{",
    "}",
    "(",
    ")",
    ";",
    "::",
    "0",
    "1",
    "42",
    "true",
    "false",
    "None",
    "Some(x)",
    "Ok(())",
    "Err(e)",
    "vec![]",
    "map",
    "key",
    "user",
    "request",
    "response",
    "timestamp",
    "handle",
    "stream",
    "// TODO",
    "assert_eq!",
    "&",
    "*",
    "<T>",
    "Vec<u8>",
    "String",
    "u64",
];

/// Code- or log-like text of about `len` bytes.
fn text(rng: &mut Rng, len: usize, log: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut t = 1_700_000_000 + rng.below(1 << 20);
    while out.len() < len {
        if log {
            t += rng.below(5);
            let level = ["INFO", "WARN", "DEBUG", "ERROR"][rng.below(4) as usize];
            out.extend_from_slice(format!("{t} host{} {level} ", rng.below(8)).as_bytes());
        } else {
            out.extend(std::iter::repeat_n(b' ', 4 * rng.below(4) as usize));
        }
        for _ in 0..3 + rng.below(10) {
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
            if rng.below(6) == 0 {
                out.extend_from_slice(rng.below(100_000).to_string().as_bytes());
                out.push(b' ');
            }
        }
        out.push(b'\n');
    }
    out
}

/// An executable or library: machine code (incompressible), padding, and string tables.
fn binary(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + (64 << 10));
    while out.len() < len {
        let n = 4096 * (1 + rng.below(16) as usize);
        match rng.below(10) {
            0..=5 => {
                let at = out.len();
                out.resize(at + n, 0);
                rng.fill(&mut out[at..]);
            }
            6 => out.resize(out.len() + n, 0),
            _ => out.extend_from_slice(&text(rng, n, false)),
        }
    }
    out.truncate(len);
    out
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    rng.fill(&mut v);
    v
}

/// A database page: a header, rows of text from the top, free space (zeros) below.
fn db_page(rng: &mut Rng) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..8].copy_from_slice(&rng.next().to_le_bytes());
    let fill = 1024 + rng.below(2560) as usize;
    let rows = text(rng, fill, true);
    page[16..16 + fill].copy_from_slice(&rows[..fill]);
    page
}

/// Writes files under `root` until `budget` bytes are written: file `i` is `len.0` plus up to `len.1` random
/// bytes long, named and filled by `make(rng, i, len)`. Returns the names, in order.
fn fill_files(
    rng: &mut Rng,
    root: &Path,
    budget: u64,
    len: (usize, u64),
    make: impl Fn(&mut Rng, usize, usize) -> (String, Vec<u8>),
) -> Vec<String> {
    let (mut used, mut names) = (0, Vec::new());
    while used < budget {
        let n = len.0 + rng.below(len.1) as usize;
        let (name, data) = make(rng, names.len(), n);
        write_file(&root.join(&name), &data);
        names.push(name);
        used += n as u64;
    }
    names
}

fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn s(p: &Path) -> String {
    p.to_str().expect("bench paths are UTF-8").to_owned()
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------------------
// Workloads

trait Workload {
    /// Turns `src` into version `v` (0 creates it), in place.
    fn make_version(&mut self, v: usize, src: &Path);
    /// The single file the tools commit, when the workload is one file (`src/NAME`); None: the tree `src`.
    fn single_file(&self) -> Option<&'static str> {
        None
    }
    fn describe(&self) -> String;
}

/// An ext4 disk image whose guest adds, rewrites and deletes files and updates a database in place.
struct VmImage {
    rng: Rng,
    mib: u64,
    stage: PathBuf,
    docs: Vec<String>,
    syslog: Vec<u8>,
    db_pages: usize,
}

impl VmImage {
    fn new(mib: u64, work: &Path) -> Self {
        VmImage {
            rng: Rng(0x7a11),
            mib,
            stage: work.join("stage"),
            docs: Vec::new(),
            syslog: Vec::new(),
            db_pages: (mib as usize * 256) / 16, // the database is 1/16 of the image
        }
    }

    fn build_root(&mut self, root: &Path) {
        let budget = self.mib << 20;
        let rng = &mut self.rng;
        // A root about half full, like a lived-in system disk: the rest is free space (zeros).
        let (bin, docs, photos) = (budget * 18 / 100, budget * 10 / 100, budget * 12 / 100);
        fill_files(rng, root, bin, (16384, 2 << 20), |rng, i, len| (format!("usr/lib/lib{i}.so"), binary(rng, len)));
        self.docs = fill_files(rng, root, docs, (512, 32 << 10), |rng, i, len| {
            (format!("usr/share/doc/pkg{}/file{i}.txt", i % 97), text(rng, len, false))
        });
        fill_files(rng, root, photos, (65536, 3 << 20), |rng, i, len| {
            (format!("home/user/photos/img{i}.jpg"), random_bytes(rng, len))
        });
        self.syslog = text(rng, (budget / 64) as usize, true);
        write_file(&root.join("var/log/syslog"), &self.syslog);
        let mut db = Vec::with_capacity(self.db_pages * 4096);
        for _ in 0..self.db_pages {
            db.extend_from_slice(&db_page(rng));
        }
        write_file(&root.join("var/lib/db/app.sqlite"), &db);
    }

    /// Runs debugfs commands against the image, as the guest's file system writes.
    fn debugfs(&self, image: &Path, cmds: &str, v: usize) -> String {
        let file = self.stage.join("cmds");
        fs::write(&file, cmds).unwrap();
        let out = Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", (1_700_000_000 + v * 86_400).to_string())
            .args(["-w", "-f", &s(&file), &s(image)])
            .stdin(Stdio::null())
            .output()
            .expect("debugfs (e2fsprogs) is needed for the vm workload");
        assert!(out.status.success(), "debugfs failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Workload for VmImage {
    fn make_version(&mut self, v: usize, src: &Path) {
        let image = src.join("disk.img");
        fs::create_dir_all(&self.stage).unwrap();
        if v == 0 {
            let root = self.stage.join("root");
            self.build_root(&root);
            fs::create_dir_all(src).unwrap();
            let uuid = "5eed0000-0000-4000-8000-00000000c0de";
            run_ok(
                Command::new("mke2fs")
                    .env("E2FSPROGS_FAKE_TIME", "1700000000")
                    .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-U", uuid, "-E", &format!("hash_seed={uuid}")])
                    .args(["-d", &s(&root), &s(&image), &format!("{}M", self.mib)]),
            );
            fs::remove_dir_all(&root).unwrap();
            return;
        }
        // The guest's week: new downloads, a grown log, edited documents, some deleted, a busy database.
        let rng = &mut self.rng;
        let mut cmds = format!("mkdir /home/user/dl{v}\ncd /home/user/dl{v}\n");
        let add = (self.mib << 20) / 40;
        let downloads = fill_files(rng, &self.stage, add, (4096, 2 << 20), |rng, i, len| {
            (format!("new{i}"), if i % 2 == 0 { random_bytes(rng, len) } else { text(rng, len, false) })
        });
        for (i, name) in downloads.iter().enumerate() {
            cmds += &format!("write {} file{i}\n", s(&self.stage.join(name)));
        }
        self.syslog.extend_from_slice(&text(rng, (self.mib << 20) as usize / 512, true));
        let local = self.stage.join("syslog");
        fs::write(&local, &self.syslog).unwrap();
        cmds += &format!("rm /var/log/syslog\ncd /var/log\nwrite {} syslog\n", s(&local));
        for j in 0..8 {
            let k = rng.below(self.docs.len() as u64) as usize;
            let name = self.docs[k].clone();
            let local = self.stage.join(format!("doc{j}"));
            let len = 512 + rng.below(32 << 10) as usize;
            fs::write(&local, text(rng, len, false)).unwrap();
            let (dir, base) = name.rsplit_once('/').unwrap();
            cmds += &format!("rm /{name}\ncd /{dir}\nwrite {} {base}\n", s(&local));
        }
        for _ in 0..12 {
            let k = rng.below(self.docs.len() as u64) as usize;
            cmds += &format!("rm /{}\n", self.docs.swap_remove(k));
        }
        self.debugfs(&image, &cmds, v);
        // The database writes its pages where they are: find them on the image and overwrite 3 % of them.
        let blocks_out = self.debugfs(&image, "blocks /var/lib/db/app.sqlite\n", v);
        let blocks: Vec<u64> = blocks_out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        assert_eq!(blocks.len(), self.db_pages, "debugfs blocks: {blocks_out:.200}");
        let mut f = OpenOptions::new().write(true).open(&image).unwrap();
        for _ in 0..self.db_pages * 3 / 100 {
            let b = blocks[self.rng.below(blocks.len() as u64) as usize];
            f.seek(SeekFrom::Start(b * 4096)).unwrap();
            f.write_all(&db_page(&mut self.rng)).unwrap();
        }
        fs::remove_dir_all(&self.stage).unwrap();
    }
    fn single_file(&self) -> Option<&'static str> {
        Some("disk.img")
    }
    fn describe(&self) -> String {
        format!(
            "{} MiB ext4 image (`mke2fs -d`, about half full); per version the guest adds {} MiB of files, \
             rewrites a growing log and 8 documents, deletes 12, and 3 % of a {} MiB database's pages are \
             overwritten in place",
            self.mib,
            self.mib / 40,
            self.db_pages / 256
        )
    }
}

struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

/// A small transformer's weights in two safetensors shards, saved whole after each stage of fine-tuning.
struct MlCheckpoints {
    rng: Rng,
    dim: usize,
    blocks: usize,
    tensors: Vec<Tensor>,
}

impl MlCheckpoints {
    fn new(dim: usize) -> Self {
        MlCheckpoints { rng: Rng(0x3141), dim, blocks: 4, tensors: Vec::new() }
    }

    fn init(&mut self) {
        let d = self.dim;
        let mut specs = vec![("embed.weight".to_owned(), vec![8 * d, d])];
        for b in 0..self.blocks {
            for (n, shape) in [
                ("attn.qkv.weight", vec![3 * d, d]),
                ("attn.out.weight", vec![d, d]),
                ("norm1.weight", vec![d]),
                ("mlp.up.weight", vec![4 * d, d]),
                ("mlp.down.weight", vec![d, 4 * d]),
                ("norm2.weight", vec![d]),
            ] {
                specs.push((format!("blocks.{b}.{n}"), shape));
            }
        }
        specs.push(("final_norm.weight".to_owned(), vec![d]));
        specs.push(("lm_head.weight".to_owned(), vec![8 * d, d]));
        for (name, shape) in specs {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 { vec![1.0; n] } else { (0..n).map(|_| self.rng.normal() * 0.02).collect() };
            self.tensors.push(Tensor { name, shape, data });
        }
    }

    /// A fine-tuning step on the tensors whose names contain one of `parts`.
    fn tune(&mut self, parts: &[&str]) {
        for t in &mut self.tensors {
            if parts.iter().any(|p| t.name.contains(p)) {
                for x in &mut t.data {
                    *x += self.rng.normal() * 1e-3;
                }
            }
        }
    }

    fn save_shard(&self, path: &Path, tensors: &[&Tensor]) {
        let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
        let mut at = 0;
        for t in tensors {
            let end = at + 4 * t.data.len();
            let shape: Vec<String> = t.shape.iter().map(|n| n.to_string()).collect();
            header += &format!(
                ",\"{}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{at},{end}]}}",
                t.name,
                shape.join(",")
            );
            at = end;
        }
        header.push('}');
        // safetensors pads the header with spaces so the data starts 8-byte aligned.
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        // A trainer saves to a temporary name and renames, so a crash never leaves half a checkpoint.
        let tmp = path.with_extension("tmp");
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp).unwrap());
        out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        out.write_all(header.as_bytes()).unwrap();
        for t in tensors {
            for x in &t.data {
                out.write_all(&x.to_le_bytes()).unwrap();
            }
        }
        out.into_inner().unwrap().sync_all().unwrap();
        fs::rename(&tmp, path).unwrap();
    }
}

impl Workload for MlCheckpoints {
    fn make_version(&mut self, v: usize, src: &Path) {
        let top = format!("blocks.{}.", self.blocks - 1);
        let upper: Vec<String> = (self.blocks / 2..self.blocks).map(|b| format!("blocks.{b}.attn")).collect();
        match v {
            0 => self.init(),
            1 => self.tune(&[&top, "final_norm", "lm_head"]),
            2 => {
                // Full fine-tuning at a small learning rate: every weight moves a little, every byte changes.
                for t in &mut self.tensors {
                    for x in &mut t.data {
                        *x *= 1.0 + self.rng.normal() * 1e-4;
                    }
                }
            }
            3 => self.tune(&upper.iter().map(String::as_str).collect::<Vec<_>>()),
            _ => self.tune(&["final_norm", "lm_head"]),
        }
        fs::create_dir_all(src).unwrap();
        let half = 1 + self.blocks / 2 * 6;
        let (a, b): (Vec<&Tensor>, Vec<&Tensor>) =
            (self.tensors.iter().take(half).collect(), self.tensors.iter().skip(half).collect());
        let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
        self.save_shard(&src.join(names[0]), &a);
        self.save_shard(&src.join(names[1]), &b);
        if v == 0 {
            let map: Vec<String> = self
                .tensors
                .iter()
                .enumerate()
                .map(|(i, t)| format!("\"{}\":\"{}\"", t.name, names[usize::from(i >= half)]))
                .collect();
            write_file(
                &src.join("model.safetensors.index.json"),
                format!("{{\"weight_map\":{{{}}}}}", map.join(",")).as_bytes(),
            );
        }
        let state = format!("{{\"global_step\":{},\"loss\":{:.4}}}\n", (v + 1) * 1000, 2.5 / (v as f64 + 1.0));
        write_file(&src.join("trainer_state.json"), state.as_bytes());
    }
    fn describe(&self) -> String {
        let bytes: usize = self.tensors.iter().map(|t| 4 * t.data.len()).sum();
        format!(
            "{} MiB of float32 in two safetensors shards ({} tensors, hidden size {}); versions: init, top block \
             and head tuned, every weight moved by ~1e-4 relative, upper attention tuned, head tuned",
            bytes >> 20,
            6 * self.blocks + 3,
            self.dim
        )
    }
}

/// A simulation writing one restart file per step: eight f64 fields, three static (mesh, material), five
/// evolving where a front passes and at a few hot spots.
struct SimRestart {
    rng: Rng,
    nx: usize,
    ny: usize,
    fields: Vec<Vec<f64>>,
    front: usize,
}

impl SimRestart {
    fn new(nx: usize, ny: usize) -> Self {
        SimRestart { rng: Rng(0x51a1), nx, ny, fields: Vec::new(), front: 0 }
    }

    fn value(field: usize, x: usize, y: usize, t: f64, burnt: bool) -> f64 {
        let base = [1.2, 0.0, 0.0, 101_325.0, 300.0][field - 3];
        let (xf, yf) = (x as f64 * 0.013, y as f64 * 0.021);
        let wave = (xf + t).sin() * (yf - 0.7 * t).cos();
        if burnt { base * 1.8 + 0.05 * wave + 1.0 } else { base + 0.01 * wave + 0.1 }
    }
}

impl Workload for SimRestart {
    fn make_version(&mut self, v: usize, src: &Path) {
        let (nx, ny) = (self.nx, self.ny);
        let t = v as f64 * 0.37;
        if v == 0 {
            let mut mesh_x = vec![0.0; nx * ny];
            let mut mesh_y = vec![0.0; nx * ny];
            let mut material = vec![0.0; nx * ny];
            for y in 0..ny {
                for x in 0..nx {
                    let i = y * nx + x;
                    mesh_x[i] = x as f64 * 1e-3 + (y as f64 * 1e-4).sin() * 1e-5;
                    mesh_y[i] = y as f64 * 1e-3;
                    material[i] = ((x / 97 + y / 61) % 3) as f64;
                }
            }
            self.fields = vec![mesh_x, mesh_y, material];
            for f in 3..8 {
                self.fields.push((0..nx * ny).map(|i| Self::value(f, i % nx, i / nx, 0.0, false)).collect());
            }
        }
        // The front advances a sixth of the domain per step; behind it cells are burnt, within its band
        // they change every step, ahead of it nothing happens.
        let band = ny / 8;
        let new_front = (v + 1) * ny / (VERSIONS + 1);
        for y in self.front.saturating_sub(band)..new_front.min(ny) {
            let burnt = y + band < new_front;
            for f in 3..8 {
                for x in 0..nx {
                    self.fields[f][y * nx + x] = Self::value(f, x, y, t, burnt);
                }
            }
        }
        self.front = new_front;
        let side = nx / 64;
        for _ in 0..4 {
            let (x0, y0) = (self.rng.below((nx - side) as u64) as usize, self.rng.below((ny - side) as u64) as usize);
            for f in 3..8 {
                for y in y0..y0 + side {
                    for x in x0..x0 + side {
                        self.fields[f][y * nx + x] *= 1.0 + 0.05 * (x as f64 * 0.3 + t).sin();
                    }
                }
            }
        }
        fs::create_dir_all(src).unwrap();
        if v == 0 {
            write_file(&src.join("input.deck"), &text(&mut self.rng, 6000, false));
        } else {
            fs::remove_file(src.join(format!("restart_{:07}.dat", v * 1000))).unwrap();
        }
        let path = src.join(format!("restart_{:07}.dat", (v + 1) * 1000));
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).unwrap());
        let mut header =
            format!("RESTART v1 step={} time={t} nx={nx} ny={ny} fields=x,y,mat,rho,vx,vy,p,T\n", (v + 1) * 1000)
                .into_bytes();
        header.resize(4096, b'\n');
        out.write_all(&header).unwrap();
        for field in &self.fields {
            for x in field {
                out.write_all(&x.to_le_bytes()).unwrap();
            }
        }
        out.flush().unwrap();
        let mut log = OpenOptions::new().create(true).append(true).open(src.join("sim.log")).unwrap();
        log.write_all(&text(&mut self.rng, 20_000, true)).unwrap();
    }
    fn describe(&self) -> String {
        format!(
            "one restart file of {} MiB ({}×{} cells, 8 f64 fields), replaced each step: 3 fields static, 5 \
             changing behind a front that sweeps a sixth of the domain per step and at 4 hot spots; plus a \
             growing log",
            (self.nx * self.ny * 64) >> 20,
            self.nx,
            self.ny
        )
    }
}

/// A source tree evolving over releases.
struct SourceTree {
    rng: Rng,
    count: usize,
    files: BTreeMap<String, Vec<u8>>,
    next: usize,
}

impl SourceTree {
    fn new(count: usize) -> Self {
        SourceTree { rng: Rng(0x50c), count, files: BTreeMap::new(), next: 0 }
    }

    fn new_file(&mut self) -> (String, Vec<u8>) {
        let rng = &mut self.rng;
        let (m, sub) = (rng.below(self.count as u64 / 100 + 1), rng.below(6));
        let name = format!(
            "{}/mod{m}/{}/file{}.rs",
            ["src", "lib", "tests"][rng.below(3) as usize],
            WORDS[sub as usize],
            self.next
        );
        self.next += 1;
        // Sizes between 256 B and 16 KiB, most of them small, as in real trees.
        let len = (256.0 * 2f64.powf(rng.below(600) as f64 / 100.0)) as usize;
        (name, text(rng, len, false))
    }
}

impl Workload for SourceTree {
    fn make_version(&mut self, v: usize, src: &Path) {
        let mut changed: Vec<String> = Vec::new();
        if v == 0 {
            for _ in 0..self.count {
                let (name, data) = self.new_file();
                changed.push(name.clone());
                self.files.insert(name, data);
            }
        } else {
            let names: Vec<String> = self.files.keys().cloned().collect();
            for _ in 0..self.count * 3 / 100 {
                let name = &names[self.rng.below(names.len() as u64) as usize];
                let data = self.files.get_mut(name).unwrap();
                // An edit: a run of lines replaced by new ones somewhere in the file.
                let at = self.rng.below(data.len() as u64) as usize;
                let cut = (at + self.rng.below(800) as usize).min(data.len());
                let len = 40 + self.rng.below(1200) as usize;
                let new = text(&mut self.rng, len, false);
                data.splice(at..cut, new);
                changed.push(name.clone());
            }
            for _ in 0..self.count / 100 {
                let (name, data) = self.new_file();
                changed.push(name.clone());
                self.files.insert(name, data);
            }
            for _ in 0..self.count / 200 {
                let name = &names[self.rng.below(names.len() as u64) as usize];
                if self.files.remove(name).is_some() {
                    fs::remove_file(src.join(name)).unwrap();
                }
            }
        }
        for name in changed {
            if let Some(data) = self.files.get(&name) {
                write_file(&src.join(&name), data);
            }
        }
        write_file(&src.join("VERSION"), format!("1.{v}.0\n").as_bytes());
    }
    fn describe(&self) -> String {
        let bytes: usize = self.files.values().map(Vec::len).sum();
        format!(
            "{} source files ({:.1} MiB) in nested directories; each release edits 3 %, adds 1 %, deletes 0.5 %",
            self.files.len(),
            bytes as f64 / 1048576.0
        )
    }
}

// ---------------------------------------------------------------------------------------------------------
// Verification

/// Every path under `dir` with, for files, size and BLAKE3 (None for directories).
fn manifest(dir: &Path) -> BTreeMap<String, Option<(u64, blake3::Hash)>> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, Option<(u64, blake3::Hash)>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{rel}{}", entry.file_name().to_string_lossy());
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                out.insert(name.clone(), None);
                walk(&entry.path(), &format!("{name}/"), out);
            } else {
                out.insert(name, Some(file_hash(&entry.path())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, "", &mut out);
    out
}

fn file_hash(path: &Path) -> (u64, blake3::Hash) {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return (len, h.finalize());
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
}

/// How `got` differs from `want`, or None if it is the same.
fn compare(want: &BTreeMap<String, Option<(u64, blake3::Hash)>>, got: &Path) -> Option<String> {
    let got = manifest(got);
    let missing = want.keys().filter(|k| !got.contains_key(*k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(*k)).count();
    let differ = want.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).count();
    if missing + extra + differ == 0 {
        return None;
    }
    let example = want
        .iter()
        .find(|(k, v)| got.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .or_else(|| got.keys().find(|k| !want.contains_key(*k)).cloned())
        .unwrap_or_default();
    Some(format!("{differ} differ, {missing} missing, {extra} extra (e.g. {example})"))
}

// ---------------------------------------------------------------------------------------------------------
// Tools

#[derive(Clone, Copy, PartialEq, Debug)]
enum Tool {
    Snapstore,
    Restic,
    Rustic,
    Borg,
    Casync,
}

impl Tool {
    const ALL: [Tool; 5] = [Tool::Snapstore, Tool::Restic, Tool::Rustic, Tool::Borg, Tool::Casync];

    fn name(self) -> &'static str {
        match self {
            Tool::Snapstore => "snapstore",
            Tool::Restic => "restic",
            Tool::Rustic => "rustic",
            Tool::Borg => "borg",
            Tool::Casync => "casync",
        }
    }

    fn settings(self) -> String {
        let s = match self {
            Tool::Snapstore if !snapstore_init_args().is_empty() => {
                return format!(
                    "`init {}` (SNAPSTORE_BENCH_INIT), one hashing thread per core",
                    snapstore_init_args().join(" ")
                );
            }
            Tool::Snapstore => {
                "defaults (FastCDC 16/64/256 KiB normalization 2, zstd 3, byte planes for numeric chunks, one hashing thread per core)"
            }
            Tool::Restic => {
                "repository version 2 (zstd, `--compression auto`), always encrypted (fixed password), local cache"
            }
            Tool::Rustic => "`init --set-compression 3`, always encrypted (fixed password), local cache",
            Tool::Borg => "`--encryption=none`, `--compression zstd,3`, files cache",
            Tool::Casync => "`--compression=zstd`, default chunk sizes (16/64/256 KiB), chunk store + .caibx/.caidx",
        };
        s.to_owned()
    }

    fn program(self) -> Option<String> {
        if self == Tool::Snapstore {
            return Some(env!("CARGO_BIN_EXE_snapstore").to_owned());
        }
        find_program(self.name())
    }

    /// Whether restoring over an older checkout writes only what differs. Found by running them (the bytes
    /// written are in every rollback cell): restic 0.14 and casync 2 write every file again (casync uses the
    /// old files only as a seed, to avoid reading the store), borg has no such mode.
    fn patches_in_place(self) -> bool {
        matches!(self, Tool::Snapstore | Tool::Rustic)
    }

    fn version(self, prog: &str) -> String {
        let arg = if self == Tool::Restic { "version" } else { "--version" };
        let out = Command::new(prog).arg(arg).output().map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).lines().next().unwrap_or("").trim().to_owned()
    }
}

struct Measured {
    secs: f64,
    written: u64,
    stdout: String,
}

/// One tool's repository for one workload, and what its commands measured.
struct Session {
    tool: Tool,
    prog: String,
    repo: PathBuf,
    cache: PathBuf,
    work: PathBuf,
    ids: Vec<String>,
    rss_kib: u64,
}

impl Session {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RESTIC_PASSWORD", RESTIC_PASSWORD.to_owned()),
            ("RUSTIC_PASSWORD", RESTIC_PASSWORD.to_owned()),
            ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes".to_owned()),
            ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes".to_owned()),
            ("BORG_BASE_DIR", s(&self.cache)),
            ("SNAPSTORE_REPO", s(&self.repo)),
        ]
    }

    /// Runs the tool under `/usr/bin/time`, in `cwd`.
    fn run(&mut self, cwd: &Path, args: &[String]) -> Result<Measured, String> {
        let timefile = self.work.join(format!("{}.time", self.tool.name()));
        // Dirty pages are counted as written only when they turn dirty, and the previous step leaves plenty;
        // syncing first also keeps its writeback out of this step's time.
        let _ = Command::new("sync").status();
        let t = Instant::now();
        let out = Command::new("/usr/bin/time")
            .args(["-f", "%M %O", "-o", &s(&timefile), &self.prog])
            .args(args)
            .envs(self.env())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("/usr/bin/time: {e}"))?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("`{} {}` failed: {}", self.tool.name(), args.join(" "), err.trim()));
        }
        let times = fs::read_to_string(&timefile).map_err(|e| format!("{}: {e}", timefile.display()))?;
        let mut nums = times.lines().last().unwrap_or("").split_whitespace().map(|w| w.parse::<u64>().unwrap_or(0));
        let (rss_kib, blocks) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
        self.rss_kib = self.rss_kib.max(rss_kib);
        Ok(Measured { secs, written: blocks * 512, stdout: String::from_utf8_lossy(&out.stdout).into_owned() })
    }

    fn init(&mut self) -> Result<(), String> {
        fs::create_dir_all(&self.cache).unwrap();
        let repo = s(&self.repo);
        let cache = s(&self.cache);
        let args: Vec<String> = match self.tool {
            Tool::Snapstore => std::iter::once("init".to_owned()).chain(snapstore_init_args()).collect(),
            Tool::Restic => vec![
                "-r".into(),
                repo,
                "--cache-dir".into(),
                cache,
                "init".into(),
                "--repository-version".into(),
                "2".into(),
            ],
            Tool::Rustic => vec![
                "-r".into(),
                repo,
                "--cache-dir".into(),
                cache,
                "init".into(),
                "--set-compression".into(),
                "3".into(),
            ],
            Tool::Borg => vec!["init".into(), "--encryption=none".into(), repo],
            Tool::Casync => {
                fs::create_dir_all(self.repo.join("store")).unwrap();
                return Ok(());
            }
        };
        let work = self.work.clone();
        self.run(&work, &args).map(|_| ())
    }

    /// Commits `src` (or `src/single`) as version `v`.
    fn commit(&mut self, v: usize, src: &Path, single: Option<&str>) -> Result<Measured, String> {
        let target = single.unwrap_or(".").to_owned();
        let (repo, cache, tag) = (s(&self.repo), s(&self.cache), format!("v{v}"));
        let (cwd, args): (PathBuf, Vec<String>) = match self.tool {
            Tool::Snapstore => {
                let path = single.map_or(src.to_path_buf(), |f| src.join(f));
                (self.work.clone(), vec!["commit".into(), s(&path), "-q".into(), "-m".into(), tag.clone()])
            }
            Tool::Restic => (
                src.into(),
                ["-r", &repo, "--cache-dir", &cache, "backup", "-q", "--host", "bench", "--tag", &tag, &target]
                    .map(String::from)
                    .to_vec(),
            ),
            Tool::Rustic => (
                src.into(),
                ["-r", &repo, "--cache-dir", &cache, "backup", "--host", "bench", "--tag", &tag, &target]
                    .map(String::from)
                    .to_vec(),
            ),
            Tool::Borg => (
                src.into(),
                ["create", "--compression", "zstd,3", &format!("{repo}::{tag}"), &target].map(String::from).to_vec(),
            ),
            Tool::Casync => {
                let (index, path) = match single {
                    Some(f) => (self.repo.join(format!("{tag}.caibx")), src.join(f)),
                    None => (self.repo.join(format!("{tag}.caidx")), src.to_path_buf()),
                };
                let store = format!("--store={}", s(&self.repo.join("store")));
                (self.work.clone(), vec!["make".into(), "--compression=zstd".into(), store, s(&index), s(&path)])
            }
        };
        let m = self.run(&cwd, &args)?;
        let id = match self.tool {
            Tool::Snapstore => m.stdout.lines().last().unwrap_or("").trim().to_owned(),
            _ => tag,
        };
        self.ids.push(id);
        Ok(m)
    }

    /// Recreates version `v` in `dest` (an empty directory, or one holding another version when `in_place`).
    fn restore(
        &mut self,
        v: usize,
        dest: &Path,
        single: Option<&str>,
        in_place: bool,
    ) -> Option<Result<Measured, String>> {
        let (repo, cache, id) = (s(&self.repo), s(&self.cache), self.ids[v].clone());
        let (cwd, args): (PathBuf, Vec<String>) = match self.tool {
            Tool::Snapstore => {
                let path = single.map_or(dest.to_path_buf(), |f| dest.join(f));
                let mut args = vec!["checkout".into(), id, s(&path)];
                if in_place {
                    args.push("--in-place".into());
                    if single.is_none() {
                        args.push("--delete".into());
                    }
                }
                (self.work.clone(), args)
            }
            Tool::Restic => (
                self.work.clone(),
                ["-r", &repo, "--cache-dir", &cache, "restore", "latest", "--host", "bench", "--tag", &id, "--target"]
                    .map(String::from)
                    .into_iter()
                    .chain([s(dest)])
                    .collect(),
            ),
            Tool::Rustic => {
                let mut args: Vec<String> =
                    ["-r", &repo, "--cache-dir", &cache, "restore", "--filter-tags", &id, "latest"]
                        .map(String::from)
                        .to_vec();
                args.push(s(dest));
                if in_place {
                    args.push("--delete".into());
                }
                (self.work.clone(), args)
            }
            Tool::Borg if in_place => return None,
            Tool::Borg => (dest.into(), vec!["extract".into(), "--sparse".into(), format!("{repo}::{id}")]),
            Tool::Casync => {
                let store = format!("--store={}", s(&self.repo.join("store")));
                let (index, path) = match single {
                    Some(f) => (self.repo.join(format!("{id}.caibx")), dest.join(f)),
                    None => (self.repo.join(format!("{id}.caidx")), dest.to_path_buf()),
                };
                let mut args = vec!["extract".into(), store, s(&index), s(&path)];
                if in_place && single.is_some() {
                    // casync 2 fails with "Stale file handle" when the blob it writes is also its seed.
                    args.insert(1, "--seed-output=no".into());
                }
                (self.work.clone(), args)
            }
        };
        Some(self.run(&cwd, &args))
    }
}

/// Extra options for `snapstore init`, from `SNAPSTORE_BENCH_INIT`.
fn snapstore_init_args() -> Vec<String> {
    std::env::var("SNAPSTORE_BENCH_INIT")
        .map_or_else(|_| Vec::new(), |v| v.split_whitespace().map(str::to_owned).collect())
}

/// The bytes of the files under `dir`, and the bytes the filesystem allocated for them (as `du` counts): a
/// store of one file per chunk pays a partly filled block per chunk, which file sizes do not show.
fn dir_bytes(dir: &Path) -> (u64, u64) {
    let Ok(entries) = fs::read_dir(dir) else { return (0, 0) };
    entries.map(|e| e.unwrap()).fold((0, 0), |(len, disk), e| {
        let (l, d) = if e.file_type().unwrap().is_dir() {
            dir_bytes(&e.path())
        } else {
            e.metadata().map_or((0, 0), |m| (m.len(), m.blocks() * 512))
        };
        (len + l, disk + d)
    })
}

// ---------------------------------------------------------------------------------------------------------
// Results

#[derive(Default)]
struct Row {
    first: Option<f64>,
    incremental: Vec<f64>,
    checkout: Option<f64>,
    checkout_bad: Option<String>,
    /// Time, bytes written, whether it counts as in place.
    rollback: Option<(f64, u64, bool)>,
    rollback_bad: Option<String>,
    repo_bytes: Option<u64>,
    /// What the repository takes on disk.
    repo_disk: Option<u64>,
    rss_kib: u64,
    failed: Option<String>,
}

impl Row {
    fn incremental(&self) -> Option<f64> {
        (!self.incremental.is_empty()).then(|| self.incremental.iter().sum::<f64>() / self.incremental.len() as f64)
    }
    fn rollback_secs(&self) -> Option<f64> {
        self.rollback.filter(|r| r.2).map(|r| r.0)
    }
}

fn secs(x: f64) -> String {
    if x < 10.0 { format!("{x:.2} s") } else { format!("{x:.1} s") }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// snapstore's ratio against the best peer, appended to its cell.
fn ratio(ours: Option<f64>, peers: &[Option<f64>]) -> String {
    let best = peers.iter().flatten().copied().fold(f64::INFINITY, f64::min);
    match ours {
        // Three places near 1, where "1.00×" could hide a miss of the target.
        Some(x) if best.is_finite() && best > 0.0 && (x / best - 1.0).abs() < 0.01 => format!(" ({:.3}×)", x / best),
        Some(x) if best.is_finite() && best > 0.0 => format!(" ({:.2}×)", x / best),
        _ => String::new(),
    }
}

fn best_peer(rows: &[(Tool, Row)], f: impl Fn(&Row) -> Option<f64>) -> Vec<Option<f64>> {
    rows.iter().filter(|(t, _)| *t != Tool::Snapstore).map(|(_, r)| f(r)).collect()
}

fn table(rows: &[(Tool, Row)], logical: u64) -> String {
    let mut out = String::from(
        "| tool | first commit | incremental commit (mean) | checkout (empty dir) | in-place rollback | repository | on disk | peak RSS |\n|---|---|---|---|---|---|---|---|\n",
    );
    let ours = rows.iter().find(|(t, _)| *t == Tool::Snapstore).map(|(_, r)| r);
    let peers_first = best_peer(rows, |r| r.first);
    let peers_incr = best_peer(rows, Row::incremental);
    let peers_checkout = best_peer(rows, |r| r.checkout);
    let peers_rollback = best_peer(rows, Row::rollback_secs);
    let peers_repo = best_peer(rows, |r| r.repo_bytes.map(|b| b as f64));
    let peers_disk = best_peer(rows, |r| r.repo_disk.map(|b| b as f64));
    let peers_rss = best_peer(rows, |r| (r.rss_kib > 0).then_some(r.rss_kib as f64));
    for (tool, r) in rows {
        let is_ours = *tool == Tool::Snapstore;
        let rat = |x: Option<f64>, peers: &[Option<f64>]| if is_ours { ratio(x, peers) } else { String::new() };
        if let Some(e) = &r.failed {
            let e: String = e.chars().take(160).collect();
            out +=
                &format!("| {} | **failed**: {} | | | | | | |\n", tool.name(), e.replace('|', "/").replace('\n', " "));
            continue;
        }
        let cell = |x: Option<f64>| x.map_or("—".to_owned(), secs);
        let mut checkout = cell(r.checkout) + &rat(r.checkout, &peers_checkout);
        if let Some(bad) = &r.checkout_bad {
            checkout += &format!(" **✗ MISMATCH: {bad}**");
        }
        let mut rollback = match r.rollback {
            None => "—".to_owned(),
            Some((t, w, true)) => format!("{}, {} written", secs(t), mib(w)) + &rat(Some(t), &peers_rollback),
            Some((t, w, false)) => format!("— (rewrites all: {}, {} written)", secs(t), mib(w)),
        };
        if let Some(bad) = &r.rollback_bad {
            rollback += &format!(" **✗ MISMATCH: {bad}**");
        }
        let _ = logical;
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            tool.name(),
            cell(r.first) + &rat(r.first, &peers_first),
            cell(r.incremental()) + &rat(r.incremental(), &peers_incr),
            checkout,
            rollback,
            r.repo_bytes.map_or("—".to_owned(), mib) + &rat(r.repo_bytes.map(|b| b as f64), &peers_repo),
            r.repo_disk.map_or("—".to_owned(), mib) + &rat(r.repo_disk.map(|b| b as f64), &peers_disk),
            mib(r.rss_kib * 1024) + &rat(Some(r.rss_kib as f64), &peers_rss),
        );
    }
    if let Some(r) = ours.filter(|r| r.failed.is_none()) {
        let best = |p: &[Option<f64>]| p.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let mark = |ok: bool| if ok { "✓" } else { "✗" };
        let mut t = Vec::new();
        if let Some(x) = r.incremental().filter(|_| best(&peers_incr).is_finite()) {
            t.push(format!("incremental ≤ ½ fastest peer {}", mark(x <= best(&peers_incr) / 2.0)));
        }
        if let Some(x) = r.checkout.filter(|_| best(&peers_checkout).is_finite()) {
            t.push(format!("checkout ≤ ½ fastest peer {}", mark(x <= best(&peers_checkout) / 2.0)));
        }
        if let Some(x) = r.repo_bytes.filter(|_| best(&peers_repo).is_finite()) {
            t.push(format!("repository ≤ smallest peer's {}", mark(x as f64 <= best(&peers_repo))));
        }
        t.push(format!("peak RSS < 64 MiB {}", mark(r.rss_kib < 64 * 1024)));
        out += &format!("\nTargets: {}.\n", t.join("; "));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Driver

type MakeWorkload = Box<dyn Fn(&Path) -> Box<dyn Workload>>;

struct Args {
    install: bool,
    quick: bool,
    write_docs: bool,
    keep: bool,
    workloads: Option<Vec<String>>,
    tools: Option<Vec<String>>,
}

fn parse_args() -> Option<Args> {
    let mut args = Args { install: false, quick: false, write_docs: false, keep: false, workloads: None, tools: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let list = |v: Option<String>| v.map(|v| v.split(',').map(str::to_owned).collect());
        match a.as_str() {
            "--list" => return None, // cargo bench -- --list
            "--bench" => {}          // cargo passes it to every bench target
            "--install" => args.install = true,
            "--quick" => args.quick = true,
            "--write-docs" => args.write_docs = true,
            "--keep" => args.keep = true,
            "--workload" | "--workloads" => args.workloads = list(it.next()),
            "--tools" | "--tool" => args.tools = list(it.next()),
            other => eprintln!("peers: ignoring argument {other}"),
        }
    }
    Some(args)
}

fn install() {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let mut apt = if root { Command::new("apt-get") } else { Command::new("sudo") };
    if !root {
        apt.arg("apt-get");
    }
    apt.env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "restic", "borgbackup", "casync"]);
    eprintln!("peers: {apt:?}");
    // Installers talk on stdout; the tables own it.
    match apt.stdout(Stdio::from(std::io::stderr())).status() {
        Ok(s) if s.success() => {}
        other => eprintln!("peers: apt-get install failed ({other:?}); tools missing will be skipped"),
    }
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo.args(["install", "--locked", "rustic-rs", "b3sum"]);
    eprintln!("peers: {cargo:?}");
    match cargo.stdout(Stdio::from(std::io::stderr())).status() {
        Ok(s) if s.success() => {}
        other => eprintln!("peers: cargo install failed ({other:?}); tools missing will be skipped"),
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpu.lines().find_map(|l| l.strip_prefix("model name")).map_or("?", |m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = mem
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {:.1} GiB memory, Linux {}", mem_kib as f64 / 1048576.0, kernel.trim())
}

/// The filesystem under `dir`, as the run's header names it, and whether it is an ext4 without a journal: the
/// only kind where ext4 skips recently freed inodes when it creates a file (`recently_deleted`), which slows
/// checkouts of many files for minutes after many were deleted (see `run_workload`).
fn filesystem(dir: &Path) -> (String, bool) {
    let kind = match rustix::fs::statfs(dir).map(|s| s.f_type as u64) {
        Ok(0xEF53) => "ext4",
        Ok(0x5846_5342) => "XFS",
        Ok(0x9123_683E) => "btrfs",
        Ok(0x0102_1994) => "tmpfs",
        _ => return ("a filesystem not recognised".into(), false),
    };
    if kind != "ext4" {
        return (kind.into(), false);
    }
    // /sys/fs/ext4/DEV/journal_task names the journal's thread, or says `<none>`.
    let journal = fs::metadata(dir).ok().and_then(|md| {
        let dev = format!("/sys/dev/block/{}:{}", rustix::fs::major(md.dev()), rustix::fs::minor(md.dev()));
        let name = fs::read_link(dev).ok()?.file_name()?.to_owned();
        fs::read_to_string(Path::new("/sys/fs/ext4").join(name).join("journal_task")).ok()
    });
    match journal.as_deref().map(str::trim) {
        Some("<none>") => ("ext4 without a journal".into(), true),
        Some(_) => ("ext4 with a journal".into(), false),
        None => ("ext4".into(), false),
    }
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Runs one workload through every tool; returns its markdown section.
/// How many times each tool's checkout is timed; the best counts.
const CHECKOUT_RUNS: usize = 3;

fn run_workload(
    name: &str,
    mut load: Box<dyn Workload>,
    tools: &[(Tool, String)],
    work: &Path,
    free_restores: bool,
) -> String {
    let src = work.join("src");
    let single = load.single_file();
    let mut sessions: Vec<(Session, Row)> = tools
        .iter()
        .map(|(tool, prog)| {
            let session = Session {
                tool: *tool,
                prog: prog.clone(),
                repo: work.join(format!("repo-{}", tool.name())),
                cache: work.join(format!("cache-{}", tool.name())),
                work: work.to_path_buf(),
                ids: Vec::new(),
                rss_kib: 0,
            };
            (session, Row::default())
        })
        .collect();
    for (session, row) in &mut sessions {
        if let Err(e) = session.init() {
            eprintln!("peers: {name}: {e}");
            row.failed = Some(e);
        }
    }
    let started = Instant::now();
    let mut manifests = Vec::new();
    for v in 0..VERSIONS {
        let t = Instant::now();
        load.make_version(v, &src);
        manifests.push(manifest(&src));
        eprintln!("peers: {name} v{v} generated in {:.1} s", t.elapsed().as_secs_f64());
        for (session, row) in &mut sessions {
            if row.failed.is_some() {
                continue;
            }
            match session.commit(v, &src, single) {
                Ok(m) if v == 0 => row.first = Some(m.secs),
                Ok(m) => row.incremental.push(m.secs),
                Err(e) => {
                    eprintln!("peers: {name}: {e}");
                    row.failed = Some(e);
                }
            }
        }
    }
    let logical: u64 = manifests[VERSIONS - 1].values().flatten().map(|(len, _)| len).sum();
    // Checkouts are timed CHECKOUT_RUNS times, the tools taking turns, and the best counts. Nothing is deleted
    // until the workload is done, and the checkouts of many files not until the whole run is over (see the
    // end of this function and `main`): on an ext4 without a journal, as on these machines, creating a
    // file skips every inode freed in the last minute or more (`recently_deleted` in ext4's allocator), so a
    // checkout of thousands of files right after thousands were deleted took 5-15x as long.
    let dest_of = |session: &Session, run: usize| work.join(format!("restore-{}-{run}", session.tool.name()));
    for run in 0..CHECKOUT_RUNS {
        for (session, row) in &mut sessions {
            if row.failed.is_some() {
                continue;
            }
            let dest = dest_of(session, run);
            fs::create_dir_all(&dest).unwrap();
            match session.restore(VERSIONS - 1, &dest, single, false) {
                Some(Ok(m)) => {
                    row.checkout = Some(row.checkout.map_or(m.secs, |best: f64| best.min(m.secs)));
                    if let Some(bad) = compare(&manifests[VERSIONS - 1], &dest) {
                        row.checkout_bad = Some(bad);
                    }
                }
                Some(Err(e)) => {
                    eprintln!("peers: {name}: {e}");
                    row.failed = Some(e);
                }
                None => {}
            }
        }
    }
    for (session, row) in &mut sessions {
        let dest = dest_of(session, CHECKOUT_RUNS - 1);
        if row.failed.is_none() && row.checkout.is_some() {
            match session.restore(VERSIONS - 2, &dest, single, true) {
                Some(Ok(m)) => {
                    row.rollback = Some((m.secs, m.written, session.tool.patches_in_place()));
                    row.rollback_bad = compare(&manifests[VERSIONS - 2], &dest);
                }
                Some(Err(e)) => {
                    eprintln!("peers: {name}: rollback: {e}");
                    row.rollback_bad = Some(e.chars().take(120).collect());
                }
                None => {}
            }
        }
        for bad in [&row.checkout_bad, &row.rollback_bad].into_iter().flatten() {
            eprintln!("peers: {name}: {}: RESTORED DATA DOES NOT MATCH THE SOURCE: {bad}", session.tool.name());
        }
        let (len, disk) = dir_bytes(&session.repo);
        (row.repo_bytes, row.repo_disk) = (Some(len), Some(disk));
        row.rss_kib = session.rss_kib;
    }
    let rows: Vec<(Tool, Row)> = sessions.into_iter().map(|(s, r)| (s.tool, r)).collect();
    let mut out = format!(
        "### `{name}`: {}\n\n{VERSIONS} versions; the last is {} in {} files. Rollback: from the last version to \
         the one before ({}).\n\n",
        load.describe(),
        mib(logical),
        manifests[VERSIONS - 1].values().flatten().count(),
        changed_between(&manifests[VERSIONS - 2], &manifests[VERSIONS - 1]),
    );
    out += &table(&rows, logical);
    if let Some(file) = single {
        out += &b3sum_line(&src.join(file), &rows);
    }
    // The checkouts filled the page cache (7.5 GiB for vm's fifteen): left there, the next workload's
    // checkouts ran while the kernel reclaimed pages (an ml checkout took 0.57 s in a full run and 0.31-0.36 s
    // alone). Restores of a few files go now, and `settle` waits out their discards and drops the cache;
    // thousands of files would free inodes and slow the next file creations (see above), and src, the one
    // workload of many files, runs last.
    let files = manifests[VERSIONS - 1].len();
    if free_restores && files < 1000 {
        for (tool, _) in &rows {
            for run in 0..CHECKOUT_RUNS {
                let _ = fs::remove_dir_all(work.join(format!("restore-{}-{run}", tool.name())));
            }
        }
        settle(work);
    }
    eprintln!("peers: {name} done in {:.0} s", started.elapsed().as_secs_f64());
    out
}

/// Leaves the machine as a workload found it, so the next one is not timed against its leftovers: waits,
/// for at most two minutes, until the disk under `dir` has stopped discarding what was just deleted, then
/// drops the clean page cache.
///
/// On a filesystem mounted with online `discard` the kernel discards freed extents once the journal commits
/// them; `/proc/diskstats` counts discarded sectors per device, so the wait ends once that count has held
/// still for a second. Dropping the cache needs root; without, the run goes on and says so. (The weights'
/// checkout after `vm` ranged 0.17-0.45 s across runs with this in place, as without: see
/// docs/benchmarks.md.)
fn settle(dir: &Path) {
    let _ = Command::new("sync").status();
    let started = Instant::now();
    if let Ok(md) = fs::metadata(dir) {
        let (major, minor) = (rustix::fs::major(md.dev()), rustix::fs::minor(md.dev()));
        let discarded = || -> Option<u64> {
            let stats = fs::read_to_string("/proc/diskstats").ok()?;
            let fields = stats
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() >= 17 && f[0].parse() == Ok(major) && f[1].parse() == Ok(minor))?;
            // After the name: reads (4 fields), writes (4), in flight, io time, weighted time, then discards
            // completed, merged, sectors, time.
            fields[16].parse().ok()
        };
        if let Some(mut last) = discarded() {
            let mut still = 0;
            while still < 4 && started.elapsed().as_secs() < 120 {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let now = discarded().unwrap_or(last);
                still = if now == last { still + 1 } else { 0 };
                last = now;
            }
        }
    }
    if let Err(e) = fs::write("/proc/sys/vm/drop_caches", "1") {
        eprintln!("peers: could not drop the page cache between workloads ({e}); later workloads may be slowed");
    }
    eprintln!("peers: settled in {:.1} s", started.elapsed().as_secs_f64());
}

fn changed_between(
    a: &BTreeMap<String, Option<(u64, blake3::Hash)>>,
    b: &BTreeMap<String, Option<(u64, blake3::Hash)>>,
) -> String {
    let files = |m: &BTreeMap<String, Option<(u64, blake3::Hash)>>| m.iter().filter(|(_, v)| v.is_some()).count();
    let differ = a.iter().filter(|(k, v)| v.is_some() && b.get(*k) != Some(v)).count();
    let added = b.keys().filter(|k| !a.contains_key(*k)).count();
    format!(
        "{differ} of its {} files differ or are gone in the last, which has {} files, {added} of them new",
        files(a),
        files(b)
    )
}

/// `b3sum` on all cores over the same file, against snapstore's mean incremental commit of it.
fn b3sum_line(file: &Path, rows: &[(Tool, Row)]) -> String {
    let Some(prog) = find_program("b3sum") else {
        return "\n`b3sum` not found: no hashing baseline.\n".to_owned();
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run = || {
        let t = Instant::now();
        run_ok(Command::new(&prog).args(["--num-threads", &threads.to_string(), &s(file)]));
        t.elapsed().as_secs_f64()
    };
    let b3 = (0..3).map(|_| run()).fold(f64::INFINITY, f64::min);
    let size = fs::metadata(file).map_or(0, |m| m.len());
    let ours = rows.iter().find(|(t, _)| *t == Tool::Snapstore).and_then(|(_, r)| r.incremental());
    match ours {
        Some(x) => format!(
            "\n`b3sum --num-threads {threads}` over the {} image: {} (best of 3); snapstore's incremental commit of \
             it: {} = {:.2}× b3sum (target ≤ 2× {}).\n",
            mib(size),
            secs(b3),
            secs(x),
            x / b3,
            if x <= 2.0 * b3 { "✓" } else { "✗" }
        ),
        None => format!("\n`b3sum --num-threads {threads}` over the {} image: {}.\n", mib(size), secs(b3)),
    }
}

fn find_program(bin: &str) -> Option<String> {
    let home = std::env::var("HOME").unwrap_or_default();
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .map(PathBuf::from)
        .chain([Path::new(&home).join(".cargo/bin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .map(|p| s(&p))
}

fn write_docs(body: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOCS_PATH);
    let doc = fs::read_to_string(&path).unwrap();
    let new = match (doc.find(DOCS_BEGIN), doc.find(DOCS_END)) {
        (Some(a), Some(b)) if a < b => format!("{}{DOCS_BEGIN}\n{body}{}", &doc[..a], &doc[b..]),
        _ => format!("{}\n{DOCS_HEADING}\n\n{DOCS_BEGIN}\n{body}{DOCS_END}\n", doc.trim_end()),
    };
    fs::write(&path, new).unwrap();
    eprintln!("peers: wrote {}", path.display());
}

fn main() {
    let Some(args) = parse_args() else { return };
    if args.install {
        install();
    }
    let wanted = |list: &Option<Vec<String>>, name: &str| list.as_ref().is_none_or(|l| l.iter().any(|x| x == name));
    let mut tools = Vec::new();
    let mut versions = Vec::new();
    for tool in Tool::ALL {
        if !wanted(&args.tools, tool.name()) {
            continue;
        }
        match tool.program() {
            Some(prog) => {
                versions.push(format!("{}: {}", tool.version(&prog), tool.settings()));
                tools.push((tool, prog));
            }
            None => eprintln!("peers: SKIPPING {}: not on PATH (run with -- --install)", tool.name()),
        }
    }
    let base = std::env::var("SNAPSTORE_BENCH_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let dir = tempfile::Builder::new().prefix("snapstore-peers").tempdir_in(base).unwrap();
    let (fs_kind, slow_after_deletes) = filesystem(dir.path());
    if slow_after_deletes {
        eprintln!(
            "peers: {} is on ext4 without a journal, which skips inodes freed in the last 1-6 minutes when it \
             creates files: if many files were deleted there lately, the checkouts of `src` are timed slow (a \
             run 30 s after deleting 150,000 files gave 1.005x casync instead of 0.5-0.6x)",
            dir.path().display()
        );
    }
    let q = args.quick;
    let workloads: Vec<(&str, MakeWorkload)> = vec![
        ("vm", Box::new(move |w| Box::new(VmImage::new(if q { 64 } else { 512 }, w)))),
        ("ml", Box::new(move |_| Box::new(MlCheckpoints::new(if q { 384 } else { 1024 })))),
        ("sim", Box::new(move |_| Box::new(if q { SimRestart::new(512, 512) } else { SimRestart::new(2048, 1024) }))),
        ("src", Box::new(move |_| Box::new(SourceTree::new(if q { 1000 } else { 5000 })))),
    ];
    let started = Instant::now();
    let mut body = String::new();
    for (name, make) in &workloads {
        if !wanted(&args.workloads, name) {
            continue;
        }
        let work = dir.path().join(name);
        fs::create_dir_all(&work).unwrap();
        let section = run_workload(name, make(&work), &tools, &work, !args.keep);
        println!("{section}");
        body += &section;
        body.push('\n');
    }
    // Everything else goes only now (when `dir` drops), not workload by workload: see `run_workload` on ext4.
    if args.keep {
        eprintln!("peers: kept {}", dir.keep().display());
    }
    let total = started.elapsed().as_secs_f64();
    let command = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench" && a != "--write-docs" && a != "--install")
        .collect::<Vec<_>>();
    let header = format!(
        "Run of {} (`cargo bench --bench peers{}{}`, {:.0} s in all), on {}, the data on {fs_kind}. Tools:\n\n{}\n\n",
        today(),
        if command.is_empty() { "" } else { " -- " },
        command.join(" "),
        total,
        machine(),
        versions.iter().map(|v| format!("- {v}")).collect::<Vec<_>>().join("\n"),
    );
    println!("{header}");
    if args.write_docs {
        write_docs(&(header + &body));
    }
}
