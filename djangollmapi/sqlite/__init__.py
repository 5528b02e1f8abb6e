"""Django's SQLite backend with writers queued in the kernel
(`djangollmapi.sqlite.base`); `settings.DATABASES` names it as the ENGINE."""
