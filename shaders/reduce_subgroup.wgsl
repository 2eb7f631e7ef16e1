// Workgroup max of a u32 with subgroup operations (any subgroup size, any lane layout): each
// subgroup reduces in registers, then one atomic max per lane combines the subgroups.
var<workgroup> red_max: atomic<u32>;

fn workgroup_max_u32(v: u32, lid: u32) -> u32 {
    if (lid == 0u) { atomicStore(&red_max, 0u); }
    workgroupBarrier();
    atomicMax(&red_max, subgroupMax(v));
    workgroupBarrier();
    let m = atomicLoad(&red_max);
    workgroupBarrier();
    return m;
}
