# The Airflow image docker-compose.yaml runs: the official image of the pinned Airflow version
# plus this project's pinned requirements (the lock includes the Celery provider and clients).
# dags/, plugins/ and include/ are mounted by docker-compose.yaml, not copied.
FROM apache/airflow:3.3.2

COPY requirements.txt /requirements.txt
# The official image's way: install as the airflow user, with Airflow itself pinned alongside,
# so nothing in the lock can move the Airflow version the image was built for.
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /requirements.txt
