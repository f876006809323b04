//! Tests of `safetensors.rs`: reading, corrupt headers, conversions, and streamed writes.

use std::borrow::Cow;

use super::*;

fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn parse(bytes: &[u8]) -> Result<Header> {
    parse_header(Path::new("x.safetensors"), bytes)
}

#[test]
fn roundtrip_in_memory() {
    let t = vec![("b".to_string(), vec![2], vec![1.0, 2.0]), ("a".to_string(), vec![1, 1], vec![-3.5])];
    let bytes = serialize_f32(&t).unwrap();
    let (start, infos, meta) = parse(&bytes).unwrap();
    assert_eq!(start % 8, 0);
    assert_eq!(meta.unwrap()["format"], "pt");
    assert_eq!(infos[0].name, "a");
    assert_eq!((infos[0].start, infos[0].end, infos[1].start, infos[1].end), (0, 4, 4, 12));
    assert_eq!(&bytes[start..start + 4], &(-3.5f32).to_le_bytes());
}

#[test]
fn corrupt_headers_name_the_tensor() {
    let too_long = {
        let mut v = raw("{}", &[]);
        v[..8].copy_from_slice(&1000u64.to_le_bytes());
        v
    };
    assert!(parse(&too_long).unwrap_err().to_string().contains("header length 1000"));
    assert!(parse(&[1, 2, 3]).is_err());
    assert!(parse(&raw("{not json", &[])).unwrap_err().to_string().contains("JSON"));
    let cases = [
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, "outside the data section"),
        (r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "needs 12 bytes"),
        (r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, "unknown dtype"),
        (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, "outside"),
        (r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, "shape"),
        (
            r#"{"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            "overlap",
        ),
    ];
    for (h, want) in cases {
        let e = parse(&raw(h, &[0u8; 8])).unwrap_err().to_string();
        assert!(e.contains("tensor `w`") && e.contains(want), "{h}: {e}");
    }
}

#[test]
fn half_precision_converts() {
    let dir = std::env::temp_dir().join(format!("hf-st-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("h.safetensors");
    let mut data = half::bf16::from_f32(1.5).to_le_bytes().to_vec();
    data.extend_from_slice(&half::f16::from_f32(-0.25).to_le_bytes());
    data.extend_from_slice(&7i64.to_le_bytes());
    let h = r#"{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F16","shape":[1],"data_offsets":[2,4]},"c":{"dtype":"I64","shape":[1],"data_offsets":[4,12]}}"#;
    std::fs::write(&p, raw(h, &data)).unwrap();
    let st = SafeTensors::open(&p).unwrap();
    assert_eq!(st.read_f32("a").unwrap().data, vec![1.5]);
    assert_eq!(st.read_f32("b").unwrap().data, vec![-0.25]);
    let e = st.read_f32("c").unwrap_err().to_string();
    assert!(e.contains("tensor `c`") && e.contains("I64"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Values asked for one tensor at a time, in the file's name order, give the bytes of the whole set;
/// values that do not fill their shape fail the write and leave the previous file as it was.
#[test]
fn streamed_writes_are_the_whole_serialisation() {
    let dir = std::env::temp_dir().join(format!("hf-st-stream-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("s.safetensors");
    let tensors = vec![
        ("zeta".to_string(), vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        ("alpha".to_string(), vec![3], vec![-1.0, 0.5, 9.0]),
    ];
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut asked = Vec::new();
    write_f32_with(&p, &shapes, |i| {
        asked.push(i);
        Ok(Cow::Owned(tensors[i].2.clone()))
    })
    .unwrap();
    assert_eq!(asked, vec![1, 0], "name order");
    assert_eq!(std::fs::read(&p).unwrap(), serialize_f32(&tensors).unwrap());
    let e = write_f32_with(&p, &shapes, |i| Ok(Cow::Owned(vec![0.0; i + 1]))).unwrap_err().to_string();
    assert!(e.contains("`alpha`") && e.contains("does not match"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), serialize_f32(&tensors).unwrap());
    // An error of `values` is returned as it is, and leaves the file as it was.
    let e = write_f32_with(&p, &shapes, |_| Err(crate::Error::st(&p, Some("x"), "unreadable"))).unwrap_err();
    assert_eq!(e.to_string(), crate::Error::st(&p, Some("x"), "unreadable").to_string());
    assert_eq!(std::fs::read(&p).unwrap(), serialize_f32(&tensors).unwrap());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Resident KiB of this process's mappings of `path` (Linux `/proc/self/smaps`).
#[cfg(target_os = "linux")]
fn mapped_rss_kib(path: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.canonicalize().unwrap().to_string_lossy().into_owned();
    let (mut inside, mut kib) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(&name);
        } else if inside && first == "Rss:" {
            kib += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kib
}

/// Reading tensors leaves none of the file's pages in the resident set: a model or checkpoint read tensor
/// by tensor holds the converted tensors, not the file besides (a resumed run held both: 1 GiB more). Each
/// tensor is converted a block at a time, its values the same across the blocks' edges.
#[cfg(target_os = "linux")]
#[test]
fn read_tensors_leave_no_file_pages_resident() {
    let dir = std::env::temp_dir().join(format!("hf-st-forget-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("big.safetensors");
    // Two tensors of distinct values, each a little over one 4 MiB block of `read_f32`: the second starts
    // off a page and a block, so its blocks and pages cross each other.
    let n = (1 << 20) + 7;
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        (0..2).map(|k| (format!("t{k}"), vec![n], (0..n).map(|i| (i * 3 + k) as f32).collect())).collect();
    std::fs::write(&p, serialize_f32(&tensors).unwrap()).unwrap();
    let st = SafeTensors::open(&p).unwrap();
    let bytes_before = st.bytes("t1").unwrap()[..8].to_vec();
    assert!(mapped_rss_kib(&p) >= 4, "touching the mapping makes pages resident");
    for (name, _, values) in &tensors {
        assert_eq!(&st.read_f32(name).unwrap().data, values, "{name}");
    }
    let kib = mapped_rss_kib(&p);
    assert!(kib <= 8, "{kib} KiB of the 8 MiB file still resident after reading every tensor");
    // The bytes are still there to be read again.
    assert_eq!(st.bytes("t1").unwrap()[..8], bytes_before[..]);
    assert_eq!(st.read_f32("t0").unwrap().data, tensors[0].2);
    drop(st);
    std::fs::remove_dir_all(&dir).unwrap();
}
