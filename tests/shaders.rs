//! Every shader specialization parses and validates with naga (no GPU needed).

use tessera::backend::wgsl::kernels::{attention_source, quant_source, AttnKey};

/// Validate with only the capabilities the source asks for: the portable variants must need none.
fn validate(src: &str, what: &str) {
    let mut caps = naga::valid::Capabilities::empty();
    if src.contains("enable f16") {
        caps |= naga::valid::Capabilities::SHADER_FLOAT16;
    }
    if src.contains("subgroupMax") {
        caps |= naga::valid::Capabilities::SUBGROUP;
    }
    let module = naga::front::wgsl::parse_str(src)
        .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(src)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
}

#[test]
fn quant_kernels_validate() {
    validate(&quant_source(false), "quant.wgsl");
    validate(&quant_source(true), "quant.wgsl with subgroups");
}

#[test]
fn every_attention_specialization_validates() {
    for recipe in 0..6u32 {
        for dp in (16..=256).step_by(16) {
            for bq in [16u32, 8, 4] {
                for f16_tile in [false, true] {
                    let key = AttnKey {
                        recipe,
                        dp,
                        bq,
                        f16_tile,
                    };
                    validate(&attention_source(key), &format!("attention {key:?}"));
                }
            }
        }
    }
}
