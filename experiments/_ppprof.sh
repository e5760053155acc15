source <(sed -n "/^set -u/,/^trap/p" experiments/gpu_calls.sh | sed "s/^N=.*/N=99/")
for v in coop pp pp_overlap; do
timeout 100 python - $v <<'PY'
import sys, dataclasses, os
v = sys.argv[1]
sys.path.insert(0, "experiments")
import gmm_profile as gp
from lcflash.kernels.gmm import mgpu_kernels as mk
base = mk.Tiles(128, 128, 64, 3, 64, chain=True, band=4)
gp.CONTRACT_TILES = {"coop": base, "pp": dataclasses.replace(base, stages=5, band=8, pingpong=True),
                     "pp_overlap": dataclasses.replace(base, stages=5, band=8, pingpong=True, overlap_mma=True)}[v]
sys.argv = ["gmm_profile.py", "--impls", "d_rhs", "--proj", "gate_up", "--groups", "4", "--t", "512",
            "--out", os.environ["OUT"] + f"/gmm_profile_d_rhs_{v}.json"]
gp.main()
PY
done
