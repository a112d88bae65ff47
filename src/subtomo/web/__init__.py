"""The web GUI (``subtomo gui``): job forms from the job contracts, the job list and pipeline, displays and selection by clicking."""
