"""Running one attempt of a job on Ray: the server-side launcher submits a Ray
Job whose entrypoint is ``driver``; the driver reserves the gang's placement
group and starts one ``RankActor`` per process."""
