"""`tunesmith studio`: a local server that speaks OpenAI's fine-tuning API (app.py), runs the jobs (jobs.py), keeps
their records (store.py) and serves the tuned models (pool.py)."""
