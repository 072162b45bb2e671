use super::*;

fn parse(b: &[u8]) -> PResult<Pickle> {
    Pickle::parse(b, &LIMITS)
}

fn unhex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn scanned_pickles_are_the_pickles_without_their_payloads() {
    // pickle.dumps({'w': b'\\x01' * 300, 'short': b'ab', 'g': OrderedDict(a=1),
    // 's': {3, 4}, 'f': frozenset([5]), 'big': 10**30, 'txt': 'é' * 3}, protocol=P) for
    // P = 0, 2, 4, 5 (4 and 5 with a FRAME).
    for (i, h) in ["286470300a56770a70310a635f636f646563730a656e636f64650a70320a28560101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010a70330a566c6174696e310a70340a7470350a5270360a735673686f72740a70370a67320a285661620a70380a67340a7470390a527031300a7356670a7031310a63636f6c6c656374696f6e730a4f726465726564446963740a7031320a2874527031330a56610a7031340a49310a737356730a7031350a635f5f6275696c74696e5f5f0a7365740a7031360a28286c7031370a49330a6149340a61747031380a527031390a7356660a7032300a635f5f6275696c74696e5f5f0a66726f7a656e7365740a7032310a28286c7032320a49350a61747032330a527032340a73566269670a7032350a4c313030303030303030303030303030303030303030303030303030303030304c0a73567478740a7032360a56e9e9e90a7032370a732e","80027d7100285801000000777101635f636f646563730a656e636f64650a7102582c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101710358060000006c6174696e317104867105527106580500000073686f727471076802580200000061627108680486710952710a580100000067710b63636f6c6c656374696f6e730a4f726465726564446963740a710c2952710d580100000061710e4b0173580100000073710f635f5f6275696c74696e5f5f0a7365740a71105d7111284b034b04658571125271135801000000667114635f5f6275696c74696e5f5f0a66726f7a656e7365740a71155d71164b0561857117527118580300000062696771198a0d00000040eaed7446d09c2c9f0c5803000000747874711a5806000000c3a9c3a9c3a9711b752e","800495ad010000000000007d94288c017794422c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101948c0573686f72749443026162948c0167948c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b01738c0173948f94284b034b04908c016694284b0591948c03626967948a0d00000040eaed7446d09c2c9f0c8c03747874948c06c3a9c3a9c3a994752e","800595ad010000000000007d94288c017794422c010000010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101010101948c0573686f72749443026162948c0167948c0b636f6c6c656374696f6e73948c0b4f726465726564446963749493942952948c0161944b01738c0173948f94284b034b04908c016694284b0591948c03626967948a0d00000040eaed7446d09c2c9f0c8c03747874948c06c3a9c3a9c3a994752e"].iter().enumerate() {
        let b = unhex(h);
        let direct = parse(&b).unwrap();
        // At an offset in a larger source, with bytes after the STOP.
        let mut file = vec![0x55u8; 1000];
        file.extend_from_slice(&b);
        file.extend_from_slice(b"trailing bytes");
        let s = scan(&file[..], 1000, file.len() as u64, 1 << 20).unwrap();
        assert_eq!(s.len, b.len() as u64, "protocol #{i}");
        if i >= 2 {
            // Protocols 3 and up have byte payloads (before, bytes are _codecs.encode calls).
            assert!(s.stream.len() < b.len(), "protocol #{i}: payloads left in");
        }
        let scanned = Pickle::parse_scanned(&s, &LIMITS).unwrap();
        // The same graph; byte payloads located in the source.
        let shifted: Vec<Value> = direct
            .values
            .iter()
            .map(|v| match v {
                Value::Bytes { at, len } => Value::Bytes {
                    at: at + 1000,
                    len: *len,
                },
                v => v.clone(),
            })
            .collect();
        assert_eq!(scanned.values, shifted, "protocol #{i}");
        assert_eq!(scanned.root, direct.root);
        let sets: Vec<usize> = scanned
            .values
            .iter()
            .filter_map(|v| match v {
                Value::Set(items) => Some(items.len()),
                _ => None,
            })
            .collect();
        if i >= 2 {
            assert_eq!(sets, vec![2, 1], "protocol #{i}: set items kept");
        }
        // Cut short: an error, not a panic.
        let cut = &file[..1000 + b.len() / 2];
        assert!(scan(cut, 1000, cut.len() as u64, 1 << 20).is_err());
    }
    // A payload claiming more than the file holds.
    let lie = b"\x80\x04B\xff\xff\x00\x00ab.";
    assert!(scan(&lie[..], 0, lie.len() as u64, 1 << 20).is_err());
    // The private opcode is refused in a pickle parsed as it is.
    assert!(
        parse(b"\xf0\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00.").is_err()
    );
}

#[test]
fn dict_of_scalars() {
    // pickle.dumps({'a': 1, 'b': [2.5, 'x'], 'c': True}, protocol=2)
    let b = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x04eX\x01\x00\x00\x00cq\x05\x88u.";
    let p = parse(b).unwrap();
    let Value::Dict(e) = p.get(p.root) else {
        panic!()
    };
    assert_eq!(e.len(), 3);
    assert_eq!(p.str(e[0].0), Some("a"));
    assert_eq!(p.int(e[0].1), Some(1));
    let items = p.seq(e[1].1).unwrap();
    assert_eq!(p.get(items[0]), &Value::Float(2.5));
    assert_eq!(p.get(e[2].1), &Value::Bool(true));
}

#[test]
fn memo_keys_dense_sparse_and_moved() {
    // 7 under key 5000 while nothing is stored (too far for the vector: the hash map),
    // 8 under key 0; then keys 1..=5100 but 5000, and the vector, growing with them, takes
    // key 5000 over from the hash map. Every key resolves.
    let mut b = b"\x80\x02K\x07r\x88\x13\x00\x000K\x08q\x000".to_vec();
    for k in (1u32..=5100).filter(|&k| k != 5000) {
        b.extend_from_slice(b"K\x09r");
        b.extend_from_slice(&k.to_le_bytes());
        b.push(b'0');
    }
    b.extend_from_slice(b"j\x88\x13\x00\x00h\x00j\xb8\x0b\x00\x00\x87.");
    let p = parse(&b).unwrap();
    let items = p.seq(p.root).unwrap();
    let ints: Vec<i64> = items.iter().map(|&i| p.int(i).unwrap()).collect();
    assert_eq!(ints, vec![7, 8, 9]);
    // Overwriting a key keeps the count; a key never stored is an error.
    assert_eq!(
        parse(b"K\x01q\x05K\x02q\x05h\x05.").map(|p| p.int(p.root)),
        Ok(Some(2))
    );
    assert!(parse(b"K\x01q\x05h\x04.")
        .unwrap_err()
        .what
        .contains("never stored"));
}

#[test]
fn longs() {
    // LONG1 of -1, of 2**63 (too big), of 2**40
    let p = parse(b"\x8a\x01\xff.").unwrap();
    assert_eq!(p.int(p.root), Some(-1));
    let p = parse(b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.").unwrap();
    assert_eq!(p.get(p.root), &Value::BigInt);
    let p = parse(b"\x8a\x06\x00\x00\x00\x00\x00\x01.").unwrap();
    assert_eq!(p.int(p.root), Some(1 << 40));
}

#[test]
fn malformed() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "without STOP"),
        (b"\x80\x02", "without STOP"),
        (b"\x80\x06.", "protocol 6"),
        (b"\xff", "unknown opcode 0xff"),
        (b".", "underflow"),
        (b"X\xff\xff\xff\xff", "truncated"),
        (b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff", "truncated"),
        (b"h\x05.", "never stored"),
        (b"(K\x01d.", "odd number"),
        (b"K\x01K\x02a.", "APPEND to a int"),
        (b"K\x01\x82\x01.", "extension registry"),
        (b"K\x01(2.", "stack underflow"),
    ];
    for (b, want) in cases {
        let e = parse(b).unwrap_err();
        assert!(e.what.contains(want), "{b:?}: {e}");
    }
}

#[test]
fn caps_hold() {
    let mut b = vec![b'('; 5000];
    b.push(b'.');
    assert!(parse(&b).unwrap_err().what.contains("nested MARK"));
    let small = Limits {
        max_values: 10,
        ..LIMITS
    };
    let b = b"]]]]]]]]]]]]].";
    assert!(Pickle::parse(b, &small)
        .unwrap_err()
        .what
        .contains("more than 10 values"));
}

#[test]
fn writer_ints_round_trip() {
    for v in [
        0u64,
        255,
        256,
        65535,
        65536,
        (1 << 31) - 1,
        1 << 31,
        1 << 40,
        u64::MAX >> 1,
    ] {
        let mut w = write::Writer::new();
        w.int(v);
        let p = parse(&w.stop()).unwrap();
        assert_eq!(p.int(p.root), Some(v as i64), "{v}");
    }
}
