"""The Celery runtime: app, settings, queues, timing signals, embedded broker."""
