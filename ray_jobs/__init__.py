"""Ray entry points (`python ray_jobs/<job>.py`, `ray job submit`) and the Ray stages they share."""
