"""The Ray jobs (`python ray_jobs/<job>.py`, `ray job submit -- python ray_jobs/<job>.py`) and the Ray stages they
share."""
