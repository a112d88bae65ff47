"""One module per job type; each defines ``SPEC`` (a :class:`~subtomo.jobs.base.JobSpec`)."""
