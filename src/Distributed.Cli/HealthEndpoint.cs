using System.Net;
using Akka.Actor;
using Distributed.Comm;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

/// <summary>
/// Plain HTTP/1.1 probes for Kubernetes (`--health-port`): <c>/livez</c> answers 200 while the process and its actor
/// system respond (a wedged actor system fails it), <c>/readyz</c> 200 once the node does its job (a worker: a member
/// of the cluster; the coordinator: its journal replayed and answering), 503 with the reason otherwise. Separate from
/// the data plane, whose Kestrel speaks HTTP/2 only.
/// </summary>
sealed class HealthEndpoint : IAsyncDisposable
{
    static readonly TimeSpan ProbeTimeout = TimeSpan.FromSeconds(2);
    readonly WebApplication _app;

    HealthEndpoint(WebApplication app) => _app = app;

    /// <summary>The actor system once it exists (a worker resolves its seed first); null until then.</summary>
    public ActorSystem? System { get; set; }

    /// <summary>Null when ready, else why not; asked on each /readyz.</summary>
    public Func<ActorSystem, CancellationToken, Task<string?>> Readiness { get; set; } = (_, _) => Task.FromResult<string?>("starting");

    /// <param name="port">null: no endpoint</param>
    public static async Task<HealthEndpoint?> StartAsync(int? port, CancellationToken cancellationToken)
    {
        if (port is null) return null;
        var builder = EmbeddedWebHost.CreateBuilder();
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Any, port.Value));
        var app = builder.Build();
        var endpoint = new HealthEndpoint(app);
        app.MapGet("/livez", (Func<CancellationToken, Task<IResult>>)(token => Answer(endpoint.LiveAsync(token))));
        app.MapGet("/readyz", (Func<CancellationToken, Task<IResult>>)(token => Answer(endpoint.ReadyAsync(token))));
        await app.StartAsync(cancellationToken);
        return endpoint;
    }

    static async Task<IResult> Answer(Task<string?> check) =>
        await check is { } problem ? Results.Text(problem + "\n", statusCode: 503) : Results.Text("ok\n");

    async Task<string?> LiveAsync(CancellationToken cancellationToken)
    {
        if (System is not { } system) return null;   // still starting (resolving the seed): alive
        if (system.WhenTerminated.IsCompleted) return "the actor system has stopped";
        try
        {
            await system.ActorSelection("/system").Ask<ActorIdentity>(new Identify(null), ProbeTimeout, cancellationToken);
            return null;
        }
        catch (Exception e) when (e is AskTimeoutException or TaskCanceledException)
        {
            return $"the actor system did not answer within {ProbeTimeout.TotalSeconds:0} s";
        }
    }

    async Task<string?> ReadyAsync(CancellationToken cancellationToken)
    {
        if (await LiveAsync(cancellationToken) is { } dead) return dead;
        if (System is not { } system) return "starting";
        try { return await Readiness(system, cancellationToken); }
        catch (Exception e) when (e is AskTimeoutException or TaskCanceledException) { return $"no answer within {ProbeTimeout.TotalSeconds:0} s"; }
    }

    /// <summary>A worker is ready once it is an Up member of the cluster.</summary>
    public static Task<string?> MemberUp(ActorSystem system)
    {
        var status = Akka.Cluster.Cluster.Get(system).SelfMember.Status;
        return Task.FromResult(status == Akka.Cluster.MemberStatus.Up ? null : $"cluster member status {status}");
    }

    /// <summary>The coordinator is ready once it is Up and the singleton has replayed its journal and answers.</summary>
    public static async Task<string?> CoordinatorAnswers(ActorSystem system, IActorRef coordinator, CancellationToken cancellationToken)
    {
        if (await MemberUp(system) is { } notUp) return notUp;
        // Any answer will do: the singleton answers only once its journal is replayed (commands wait until then).
        await coordinator.Ask<Cluster.JobStatus>(new Cluster.JobStatusRequest(), ProbeTimeout, cancellationToken);
        return null;
    }

    public async ValueTask DisposeAsync()
    {
        using var deadline = new CancellationTokenSource(TimeSpan.FromSeconds(1));
        await _app.StopAsync(deadline.Token);
        await _app.DisposeAsync();
    }
}
