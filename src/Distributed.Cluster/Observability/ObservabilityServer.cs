using System.Net;
using System.Reflection;
using System.Text.Json;
using Akka.Actor;
using Distributed.Comm;
using Distributed.Core;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Prometheus;

namespace Distributed.Cluster;

/// <summary>
/// The coordinator's HTTP side: Prometheus' <c>/metrics</c> on cluster.metrics-port and the status page (with its
/// data at <c>/api/status</c>) on cluster.status-port, served by Kestrel from the <see cref="StatusBoard"/> that a
/// <see cref="JobStatusActor"/> keeps: a request reads an immutable view and never waits on an actor. Where they
/// listen goes to run.dir/endpoints.json.
/// </summary>
public sealed class ObservabilityServer : IAsyncDisposable
{
    public const string MetricsPath = "/metrics", StatusApiPath = "/api/status";

    public static readonly JsonSerializerOptions Json = new(JsonSerializerDefaults.Web) { WriteIndented = false };

    readonly WebApplication _app;

    ObservabilityServer(WebApplication app, string? metricsUrl, string? statusUrl) => (_app, MetricsUrl, StatusUrl) = (app, metricsUrl, statusUrl);

    public string? MetricsUrl { get; }
    public string? StatusUrl { get; }

    /// <summary>Starts watching the job and serving; null when neither port is on.</summary>
    public static async Task<ObservabilityServer?> StartAsync(ActorSystem system, IActorRef coordinator, JobSpec spec, int workers, ILoggerFactory loggerFactory)
    {
        var o = spec.Observability;
        if (!o.Serves) return null;
        var board = new StatusBoard(JobStatusView.Empty(spec.Name, workers) with { LastStep = spec.Train.MaxIters });
        var metrics = new JobMetrics(board);
        system.ActorOf(JobStatusActor.Props(coordinator, board, metrics, spec.RunDir), "job-status");

        var builder = EmbeddedWebHost.CreateBuilder();
        var address = o.HttpHost is "0.0.0.0" or "*" ? IPAddress.Any : IPAddress.Parse(o.HttpHost);
        ListenOptions? metricsListener = null, statusListener = null;
        builder.WebHost.ConfigureKestrel(k =>
        {
            // -1: any free port (the bound one is read back below).
            if (o.MetricsPort != 0) k.Listen(address, Math.Max(0, o.MetricsPort), l => metricsListener = l);
            if (o.StatusPort != 0 && o.StatusPort != o.MetricsPort) k.Listen(address, Math.Max(0, o.StatusPort), l => statusListener = l);
        });
        var app = builder.Build();
        app.MapGet(MetricsPath, async (HttpContext context) =>
        {
            context.Response.ContentType = PrometheusConstants.TextContentTypeWithVersionAndEncoding;
            await metrics.Registry.CollectAndExportAsTextAsync(context.Response.Body, context.RequestAborted);
        });
        app.MapGet(StatusApiPath, () => Results.Json(board.Current, Json));
        foreach (var (path, file, type) in new[] { ("/", "index.html", "text/html; charset=utf-8"), ("/status.js", "status.js", "text/javascript"), ("/status.css", "status.css", "text/css") })
        {
            var bytes = StaticFile(file);
            app.MapGet(path, () => Results.Bytes(bytes, type));
        }
        await app.StartAsync();

        string host = address.Equals(IPAddress.Any) ? Dns.GetHostName() : o.HttpHost;
        string? Url(ListenOptions? l, string path) => l?.IPEndPoint is { } ep ? $"http://{host}:{ep.Port}{path}" : null;
        var server = new ObservabilityServer(app, Url(metricsListener, MetricsPath), Url(statusListener ?? (o.StatusPort != 0 ? metricsListener : null), "/"));
        File.WriteAllText(RunFiles.In(spec.RunDir, RunFiles.Endpoints), JsonSerializer.Serialize(new { metrics = server.MetricsUrl, status = server.StatusUrl }) + "\n");
        loggerFactory.CreateLogger("coordinator").LogInformation("Watching the job: Prometheus metrics at {Metrics}, status page at {Status}",
            server.MetricsUrl ?? "(off)", server.StatusUrl ?? "(off)");
        return server;
    }

    static byte[] StaticFile(string name)
    {
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream("status/" + name)
            ?? throw new InvalidOperationException($"the status page's {name} is missing from the build");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    }

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
