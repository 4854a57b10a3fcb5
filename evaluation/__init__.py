"""The guard's evaluation: calibration on a subject, detection metrics against attacks beside baselines
and controls (detector_eval), and adaptive attackers against the deployed pipeline (adaptive_eval)."""
if __name__ != "semguard.evaluation":  # this folder installs as semguard.evaluation only (ARCHITECTURE.md, Packaging)
    raise ImportError(f"import semguard.evaluation, not {__name__}: semguard installs one import name")
