//! Signed headers: every pre-payload and payload check rejects its hostile case with its own
//! reason, and every decoder survives random and mutated bytes.

use std::collections::BTreeSet;

use fedtune_protocol::envelope::{
    Expectations, PayloadKind, Seal, check_header, check_payload_digest, digest, seal,
};
use fedtune_protocol::messages::{FrameDecoder, MAX_CONTROL, decode, encode, frame};
use fedtune_protocol::{
    DeclineReason, Identity, PublicKey, Rejection, SignedHeader, ToClient, ToCoordinator,
};
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000_000;

fn ids() -> (Identity, Identity) {
    (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]))
}

fn sealed(id: &Identity, payload: &[u8], f: impl FnOnce(&mut Seal<'_>)) -> SignedHeader {
    let mut s = Seal {
        kind: PayloadKind::Update,
        federation: "fed",
        round: 3,
        plan_hash: [7; 32],
        parent: [9; 32],
        nonce: [0; 16],
        now_ms: NOW,
        ttl_ms: 60_000,
        num_examples: 10,
        metrics: vec![("train_loss".into(), 1.5)],
    };
    f(&mut s);
    seal(id, s, payload)
}

fn check(
    h: &SignedHeader,
    admitted: &BTreeSet<PublicKey>,
    seen: &BTreeSet<(PublicKey, u64)>,
) -> Result<(), Rejection> {
    let e = Expectations {
        federation: "fed",
        admitted,
        open_round: Some(3),
        plan_hash: [7; 32],
        parent: [9; 32],
        seen,
        max_payload: 1000,
        max_skew_ms: 5_000,
        kind: PayloadKind::Update,
    };
    check_header(h, &e, NOW + 1)
}

#[test]
fn each_hostile_header_is_rejected_with_its_reason() {
    let (alice, mallory) = ids();
    let admitted = BTreeSet::from([alice.public()]);
    let none = BTreeSet::new();
    let payload = b"adapter bytes".to_vec();
    let good = sealed(&alice, &payload, |_| {});
    assert_eq!(check(&good, &admitted, &none), Ok(()));
    assert_eq!(check_payload_digest(&good.header, &payload), Ok(()));

    let label = |h: &SignedHeader, seen: &BTreeSet<(PublicKey, u64)>| {
        check(h, &admitted, seen).unwrap_err().label()
    };
    assert_eq!(
        label(&sealed(&mallory, &payload, |_| {}), &none),
        "unknown_key"
    );
    let mut tampered = good.clone();
    tampered.header.num_examples = 1_000_000;
    assert_eq!(label(&tampered, &none), "bad_signature");
    let mut forged = good.clone();
    forged.signature[0] ^= 1;
    assert_eq!(label(&forged, &none), "bad_signature");
    assert_eq!(
        label(&sealed(&alice, &payload, |s| s.federation = "other"), &none),
        "wrong_federation"
    );
    assert_eq!(
        label(&sealed(&alice, &payload, |s| s.round = 2), &none),
        "round_not_open"
    );
    let seen = BTreeSet::from([(alice.public(), 3)]);
    assert_eq!(label(&good, &seen), "replay");
    assert_eq!(
        label(&sealed(&alice, &payload, |s| s.plan_hash = [0; 32]), &none),
        "wrong_plan"
    );
    assert_eq!(
        label(&sealed(&alice, &payload, |s| s.parent = [0; 32]), &none),
        "stale_global"
    );
    assert_eq!(
        label(
            &sealed(&alice, &payload, |s| s.now_ms = NOW - 120_000),
            &none
        ),
        "expired"
    );
    assert_eq!(
        label(
            &sealed(&alice, &payload, |s| s.now_ms = NOW + 60_000),
            &none
        ),
        "expired"
    );
    assert_eq!(
        label(
            &sealed(&alice, &payload, |s| s.kind = PayloadKind::Global),
            &none
        ),
        "wrong_kind"
    );
    assert_eq!(
        label(
            &sealed(&alice, &payload, |s| s.metrics =
                vec![("x".into(), f64::NAN)]),
            &none
        ),
        "bad_metrics"
    );
    assert_eq!(
        label(&sealed(&alice, &vec![0u8; 2000], |_| {}), &none),
        "too_large"
    );
    // After the payload: a different payload under a valid header.
    assert_eq!(
        check_payload_digest(&good.header, b"adapter bytez")
            .unwrap_err()
            .label(),
        "digest_mismatch"
    );
    assert_eq!(
        check_payload_digest(&good.header, b"short")
            .unwrap_err()
            .label(),
        "length_mismatch"
    );
    assert_eq!(good.header.payload_digest, digest(&payload));
}

#[test]
fn messages_round_trip_and_frames_reassemble() {
    let (alice, _) = ids();
    let payload = vec![5u8; 100];
    let h = sealed(&alice, &payload, |_| {});
    // An upload's header frame.
    let bytes = encode(&h);
    let back: SignedHeader = decode(&bytes, MAX_CONTROL, "update header").unwrap();
    assert_eq!(back, h);
    assert!(decode::<SignedHeader>(&bytes, 10, "update header").is_err());
    let msg = ToCoordinator::Decline {
        round: 3,
        reason: DeclineReason::Training("out of memory".into()),
    };
    let bytes = encode(&msg);
    let back: ToCoordinator = decode(&bytes, MAX_CONTROL, "message").unwrap();
    assert_eq!(back, msg);
    let mut d = FrameDecoder::new(1 << 16);
    let framed = [frame(&bytes), frame(b"x")].concat();
    let mut got = Vec::new();
    for chunk in framed.chunks(7) {
        got.extend(d.push(chunk).unwrap());
    }
    assert_eq!(got, vec![bytes, b"x".to_vec()]);
    let mut d = FrameDecoder::new(16);
    assert!(
        d.push(&u32::MAX.to_le_bytes()).is_err(),
        "oversized frames are refused"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoders_survive_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ToCoordinator>(&bytes, MAX_CONTROL, "m");
        let _ = decode::<ToClient>(&bytes, MAX_CONTROL, "m");
        let _ = decode::<SignedHeader>(&bytes, MAX_CONTROL, "m");
        let _ = FrameDecoder::new(1 << 16).push(&bytes);
        let _ = fedtune_protocol::peft::decode(&bytes, &Default::default(), |_, _| 1.0);
    }

    #[test]
    fn decoders_survive_mutated_messages(pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let (alice, _) = ids();
        let h = sealed(&alice, b"payload", |_| {});
        let mut bytes = encode(&h);
        let i = pos.index(bytes.len());
        bytes[i] = val;
        let n = cut.index(bytes.len() + 1);
        if let Ok(header) = decode::<SignedHeader>(&bytes[..n], MAX_CONTROL, "m") {
            // A mutated header that still decodes must not verify unless it is unchanged.
            let _ = header.signature_valid();
        }
    }
}

/// Control messages keep their encodings: `Hello` is variant 0 and `Decline` variant 2 (index 1
/// was an update carried as a control message, before uploads had streams of their own), and a
/// frame that uses index 1 does not decode.
#[test]
fn control_messages_keep_their_variant_indices() {
    let (alice, _) = ids();
    let hello = encode(&ToCoordinator::Hello {
        version: 2,
        client: alice.public(),
    });
    assert_eq!(hello[0], 0);
    let decline = encode(&ToCoordinator::Decline {
        round: 1,
        reason: DeclineReason::Plan("x".into()),
    });
    assert_eq!(decline[0], 2);
    let mut old = decline.clone();
    old[0] = 1;
    assert!(decode::<ToCoordinator>(&old, MAX_CONTROL, "message").is_err());
}
