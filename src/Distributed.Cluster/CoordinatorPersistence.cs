using Distributed.Core;

namespace Distributed.Cluster;

/// <summary>
/// Where the coordinator's journal lives (Akka.Persistence.Sql, configured by HOCON): a SQLite file in the run
/// directory by default, or PostgreSQL. A run directory has a run id, created with it; the journal's persistence id
/// comes from it, so `--overwrite` (a new directory, a new id) never replays an older job's events.
/// </summary>
public static class CoordinatorPersistence
{
    public const string JournalFile = "journal.db";
    public const string RunIdFile = "run-id";
    public const string PostgresEnvironmentVariable = "DTRAIN_POSTGRES";

    public static string PersistenceId(string runDir) => "dtrain-job-" + RunId(runDir);

    /// <summary>The run directory's id, created on first use.</summary>
    public static string RunId(string runDir)
    {
        string path = Path.Combine(runDir, RunIdFile);
        if (File.Exists(path)) return File.ReadAllText(path).Trim();
        Directory.CreateDirectory(runDir);
        string id = Guid.NewGuid().ToString("N");
        File.WriteAllText(path, id + "\n");
        return id;
    }

    public static string ConnectionString(JobSpec spec)
    {
        var p = spec.Persistence;
        if (p.ConnectionString.Length > 0) return p.ConnectionString;
        if (p.Provider == "sqlite") return $"Data Source={Path.GetFullPath(Path.Combine(spec.RunDir, JournalFile))}";
        return Environment.GetEnvironmentVariable(PostgresEnvironmentVariable) is { Length: > 0 } fromEnvironment
            ? fromEnvironment
            : throw new ConfigException(
                $"config key 'persistence.provider' is postgresql but neither 'persistence.connection-string' nor ${PostgresEnvironmentVariable} gives a connection string");
    }

    /// <summary>The akka.persistence section for the coordinator's node.</summary>
    public static string Hocon(JobSpec spec)
    {
        string provider = spec.Persistence.Provider == "sqlite" ? "SQLite.MS" : "PostgreSQL.15";
        string connection = ConnectionString(spec).Replace("\\", "\\\\").Replace("\"", "\\\"");
        return $$"""
            akka.persistence {
              journal.plugin = "akka.persistence.journal.sql"
              snapshot-store.plugin = "akka.persistence.snapshot-store.sql"
              journal.sql {
                class = "Akka.Persistence.Sql.Journal.SqlWriteJournal, Akka.Persistence.Sql"
                connection-string = "{{connection}}"
                provider-name = "{{provider}}"
                auto-initialize = true
              }
              snapshot-store.sql {
                class = "Akka.Persistence.Sql.Snapshot.SqlSnapshotStore, Akka.Persistence.Sql"
                connection-string = "{{connection}}"
                provider-name = "{{provider}}"
                auto-initialize = true
              }
            }
            """;
    }
}
