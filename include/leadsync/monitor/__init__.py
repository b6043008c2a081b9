"""Monitoring: what the Airflow UI shows about leadsync (Asset events, the Conversions pages,
the status API), read from the state store only. Importable without Airflow running."""
