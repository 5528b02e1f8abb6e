"""Django's PostgreSQL backend with a pool that lends only live connections
(`djangollmapi.postgresql.base`); `settings.DATABASES` names it as the ENGINE."""
