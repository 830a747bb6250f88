using Akka.Actor;
using Distributed.Cluster;
using Distributed.Cluster.Config;
using Distributed.Core;
using Distributed.Training;
using Microsoft.Extensions.Logging;

namespace Distributed.Cli;

/// <summary>
/// Runs a job on a cluster: this process is the coordinator node (the seed); with <c>spawnWorkers</c> it also starts
/// the worker processes on loopback (the single-host simulation). Progress comes back as job events.
/// </summary>
static class ClusterJob
{
    /// <summary>How long a simulation waits for its own workers; a standalone coordinator waits as long as it takes.</summary>
    public static readonly TimeSpan RegistrationTimeout = TimeSpan.FromMinutes(2);

    public static async Task<(EvalResult? Result, long Steps)> RunAsync(JobSpec spec, int workers, string? resumeFrom, bool spawnWorkers,
        string host, int port, ITrainingObserver observer, ILogger logger, CancellationToken cancellationToken)
    {
        var system = ClusterBootstrap.Start(ClusterBootstrap.CoordinatorRole, host, port, []);
        var cluster = Akka.Cluster.Cluster.Get(system);
        cluster.Join(cluster.SelfAddress);   // the coordinator is the seed
        string seed = $"{cluster.SelfAddress.Host}:{cluster.SelfAddress.Port}";
        logger.LogInformation("Coordinator at akka.tcp://{System}@{Seed}, waiting for {Workers} workers", ClusterBootstrap.SystemName, seed, workers);
        // Disposed after the actor system has stopped: workers told to shut down get a moment to exit by themselves.
        using var processes = spawnWorkers ? new WorkerProcesses(workers, seed) : null;
        try
        {
            var coordinator = ClusterRoles.StartCoordinator(system, JobConfigLoader.ToHocon(spec), workers, resumeFrom);
            var events = JobEvents.Subscribe(system, coordinator);
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            var workerExit = processes?.FirstUnexpectedExit(stop.Token) ?? Task.Delay(Timeout.Infinite, stop.Token).ContinueWith(_ => "");
            var registration = Task.Delay(spawnWorkers ? RegistrationTimeout : Timeout.InfiniteTimeSpan, stop.Token);
            EvalResult? lastEval = null;
            long firstStep = 0, lastStep = 0;
            bool started = false;
            try
            {
                while (true)
                {
                    var next = events.ReadAsync(stop.Token).AsTask();
                    var done = await Task.WhenAny(next, workerExit, registration);
                    if (done == workerExit) throw new UserFacingException(await workerExit);
                    if (done == registration && !started)
                        throw new UserFacingException($"the job did not start within {RegistrationTimeout.TotalSeconds:0} s: fewer than {workers} workers registered");
                    if (done == registration) { registration = Task.Delay(Timeout.Infinite, stop.Token); continue; }
                    switch (await next)
                    {
                        case JobStarted s:
                            started = true;
                            (firstStep, lastStep) = (s.FirstStep, s.LastStep);
                            logger.LogInformation("Generation {Generation}: {World} workers, steps {First}..{Last}", s.Generation, s.WorldSize, s.FirstStep + 1, s.LastStep);
                            observer.OnStart(s.FirstStep, s.LastStep);
                            break;
                        case JobStepReport r:
                            observer.OnStep(r.Metrics);
                            break;
                        case JobEvalReport e:
                            lastEval = e.Result;
                            observer.OnEval(e.Result);
                            break;
                        case JobCompleted c:
                            if (c.FinalCheckpoint is not null) observer.OnCheckpoint(c.Step, c.FinalCheckpoint);
                            return (lastEval, lastStep - firstStep);
                        case JobFailed f:
                            throw new UserFacingException($"the job failed: {f.Reason}");
                    }
                }
            }
            finally
            {
                stop.Cancel();
            }
        }
        finally
        {
            // The whole cluster ends with the job: no graceful leave to wait for (Akka's remoting shutdown would
            // otherwise hold the launcher for its full timeout, about 9 s).
            await system.Terminate().WaitAsync(TimeSpan.FromSeconds(1)).ContinueWith(_ => { });
        }
    }
}
