"""The fork server's first preload (`forkserver.WORKER_MODULES`): importing it applies
`process_env.single_threaded_blas` in the fork server, before the modules preloaded after it load numpy there. The
server is started from processes that may run anything (a Dagster step), so its own environment is set here, in the
one process that only ever forks download workers, rather than by changing the starting process's.
"""

from laion_assets.core.download.process_env import single_threaded_blas

single_threaded_blas()
