//! Every shader specialization parses and validates with naga (no GPU needed).

use tessera::backend::wgsl::kernels::{attention_source, quant_source, AttnKey};

fn validate(src: &str, what: &str) {
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
}

#[test]
fn quant_kernels_validate() {
    validate(&quant_source(), "quant.wgsl");
}

#[test]
fn every_attention_specialization_validates() {
    for recipe in 0..5u32 {
        for dp in (16..=256).step_by(16) {
            for bq in [16u32, 8, 4] {
                let key = AttnKey { recipe, dp, bq };
                validate(&attention_source(key), &format!("attention {key:?}"));
            }
        }
    }
}
