//! Reading TensorBoard event files back in tests.

use std::path::Path;

/// The scalars of TensorBoard event files under `dir/runs/`: (tag, step, value), read back
/// with the `tfrecord` crate's reader.
pub fn scalars(dir: &Path) -> Vec<(String, i64, f32)> {
    use tfrecord::protobuf::event::What;
    use tfrecord::protobuf::summary::value::Value as V;
    let mut out = Vec::new();
    for f in std::fs::read_dir(dir.join("runs")).unwrap().flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events =
            tfrecord::RecordIter::<tfrecord::Event, _>::open(f.path(), Default::default()).unwrap();
        for e in events {
            let e = e.unwrap();
            if let Some(What::Summary(s)) = e.what {
                for v in s.value {
                    if let Some(V::SimpleValue(x)) = v.value {
                        out.push((v.tag, e.step, x));
                    }
                }
            }
        }
    }
    out
}
