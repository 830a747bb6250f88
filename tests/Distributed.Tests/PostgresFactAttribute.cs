using Npgsql;

namespace Distributed.Tests;

/// <summary>
/// A test that needs the PostgreSQL server named by $DTRAIN_POSTGRES (`.ci/run` starts one with .ci/postgres.sh).
/// Without a reachable server it is reported as skipped, with the reason, never passed.
/// </summary>
public sealed class PostgresFactAttribute : FactAttribute
{
    public const string Variable = "DTRAIN_POSTGRES";

    static readonly Lazy<string?> Unreachable = new(() =>
    {
        string? connection = Environment.GetEnvironmentVariable(Variable);
        if (string.IsNullOrEmpty(connection)) return $"${Variable} is not set (export \"$(.ci/postgres.sh)\" starts a local server)";
        try
        {
            using var c = new NpgsqlConnection(new NpgsqlConnectionStringBuilder(connection) { Timeout = 5 }.ConnectionString);
            c.Open();
            return null;
        }
        catch (Exception e)
        {
            return $"PostgreSQL at ${Variable} is unreachable: {e.Message}";
        }
    });

    public PostgresFactAttribute()
    {
        if (Unreachable.Value is { } reason) Skip = reason;
    }
}
