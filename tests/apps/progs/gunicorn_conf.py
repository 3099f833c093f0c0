"""gunicorn settings for the app matrix: say when each worker is ready."""


def post_worker_init(worker):
    print(f"worker {worker.pid} ready", flush=True)
