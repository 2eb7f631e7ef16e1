// Workgroup max of a u32 through workgroup memory (the path without subgroup operations).
var<workgroup> red: array<u32, 64>;

fn workgroup_max_u32(v: u32, lid: u32) -> u32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let m = red[0];
    workgroupBarrier();
    return m;
}
